// haltkit._cpu: the host build of the fused ops. Raw pointers in, no libtorch linkage.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bind_args.h"

namespace py = pybind11;

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "haltkit native CPU kernels (see haltkit/native.py for the Python side)";
  m.def(
      "decode_step",
      [](const hk::Ints& logits, const hk::Ints& hidden, const hk::Ints& head, const hk::Ints& requests,
         const hk::Ints& state, const hk::Ints& outputs, int num_threads) {
        const hk::DecodeStepArgs a = hk::decode_step_args(logits, hidden, head, requests, state, outputs);
        py::gil_scoped_release release;
        hk::decode_step_cpu(a, num_threads);
      },
      py::arg("logits"), py::arg("hidden"), py::arg("head"), py::arg("requests"), py::arg("state"),
      py::arg("outputs"), py::arg("num_threads"));
}

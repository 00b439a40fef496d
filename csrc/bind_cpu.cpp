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
  m.def(
      "exit_rules",
      [](const hk::Ints& logits, const hk::Ints& hidden, const hk::Ints& head, const hk::Ints& requests,
         const hk::Ints& state, const hk::Ints& rules, int num_threads) {
        const hk::ExitRulesArgs x = hk::exit_rules_args(logits, hidden, head, requests, state, rules);
        py::gil_scoped_release release;
        hk::exit_rules_cpu(x, num_threads);
      },
      py::arg("logits"), py::arg("hidden"), py::arg("head"), py::arg("requests"), py::arg("state"),
      py::arg("rules"), py::arg("num_threads"));
  m.def(
      "verify_step",
      [](const hk::Ints& logits, const hk::Ints& hidden, const hk::Ints& head, const hk::Ints& requests,
         const hk::Ints& state, const hk::Ints& drafts, const hk::Ints& outputs, int num_threads) {
        const hk::VerifyStepArgs v = hk::verify_step_args(logits, hidden, head, requests, state, drafts, outputs);
        py::gil_scoped_release release;
        hk::verify_step_cpu(v, num_threads);
      },
      py::arg("logits"), py::arg("hidden"), py::arg("head"), py::arg("requests"), py::arg("state"),
      py::arg("drafts"), py::arg("outputs"), py::arg("num_threads"));
  // The generator's pieces on their own, so tests hold them to the reference bit for bit.
  m.def(
      "random_words",
      [](uint64_t seed, uint32_t step, uint32_t stream, uint32_t num) {
        std::vector<uint32_t> w(num);
        for (uint32_t i = 0; i < num; ++i) w[i] = hk::philox_word(seed, step, stream, i);
        return w;
      },
      py::arg("seed"), py::arg("step"), py::arg("stream"), py::arg("num"));
  m.def(
      "gumbel_from_words",
      [](const std::vector<uint32_t>& words) {
        std::vector<float> g(words.size());
        for (size_t i = 0; i < words.size(); ++i) g[i] = hk::gumbel_from_word(words[i]);
        return g;
      },
      py::arg("words"));
}

// haltkit._C: the CUDA build of the fused ops. Raw pointers and a stream handle in, no libtorch
// linkage; cudart is linked statically, so importing this module never needs a driver.
// Built a second time as haltkit._cuda_emu (HK_CUDA_EMU: the same kernels over the host
// emulation of csrc/emu), which adds the emulator's controls.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bind_args.h"

#if defined(HK_CUDA_EMU)
#include "emu/emu_config.h"
#define HK_MODULE _cuda_emu
#else
#define HK_MODULE _C
#endif

namespace py = pybind11;

PYBIND11_MODULE(HK_MODULE, m) {
  m.doc() = "haltkit CUDA kernels (see haltkit/native.py for the Python side)";
  m.def(
      "decode_step",
      [](const hk::Ints& logits, const hk::Ints& hidden, const hk::Ints& head, const hk::Ints& requests,
         const hk::Ints& state, const hk::Ints& outputs, const hk::Ints& split, int device, int64_t stream) {
        hk::DecodeStepArgs a = hk::decode_step_args(logits, hidden, head, requests, state, outputs);
        hk::expect_len("split", split, 2);  // (workspace of B * parts GreedyPart, parts per row)
        a.parts = hk::ptr<hk::GreedyPart>(split[0]);
        a.num_parts = split[1];
        if (a.num_parts > 1 && a.parts == nullptr)
          throw std::invalid_argument("decode_step: splitting rows needs a workspace");
        py::gil_scoped_release release;
        hk::decode_step_cuda(a, device, reinterpret_cast<void*>(static_cast<uintptr_t>(stream)));
      },
      py::arg("logits"), py::arg("hidden"), py::arg("head"), py::arg("requests"), py::arg("state"),
      py::arg("outputs"), py::arg("split"), py::arg("device"), py::arg("stream"));
  m.def(
      "exit_rules",
      [](const hk::Ints& logits, const hk::Ints& hidden, const hk::Ints& head, const hk::Ints& requests,
         const hk::Ints& state, const hk::Ints& rules, int device, int64_t stream) {
        const hk::ExitRulesArgs x = hk::exit_rules_args(logits, hidden, head, requests, state, rules);
        py::gil_scoped_release release;
        hk::exit_rules_cuda(x, device, reinterpret_cast<void*>(static_cast<uintptr_t>(stream)));
      },
      py::arg("logits"), py::arg("hidden"), py::arg("head"), py::arg("requests"), py::arg("state"),
      py::arg("rules"), py::arg("device"), py::arg("stream"));
  m.def(
      "verify_step",
      [](const hk::Ints& logits, const hk::Ints& hidden, const hk::Ints& head, const hk::Ints& requests,
         const hk::Ints& state, const hk::Ints& drafts, const hk::Ints& outputs, int device, int64_t stream) {
        const hk::VerifyStepArgs v = hk::verify_step_args(logits, hidden, head, requests, state, drafts, outputs);
        py::gil_scoped_release release;
        hk::verify_step_cuda(v, device, reinterpret_cast<void*>(static_cast<uintptr_t>(stream)));
      },
      py::arg("logits"), py::arg("hidden"), py::arg("head"), py::arg("requests"), py::arg("state"),
      py::arg("drafts"), py::arg("outputs"), py::arg("device"), py::arg("stream"));
  m.def(
      "probe",
      [](int device) -> std::string {
        try {
          py::gil_scoped_release release;
          hk::probe_cuda(device);
        } catch (const std::exception& e) {
          return e.what();
        }
        return "";
      },
      py::arg("device"),
      "Why the kernels cannot run on `device` (a driver too old, no code for its arch), or '' when they can.");
#if defined(HK_CUDA_EMU)
  m.def(
      "set_schedule",
      [](const std::string& name, uint64_t seed) {
        hkemu::Schedule s;
        if (name == "forward") s = hkemu::Schedule::Forward;
        else if (name == "reverse") s = hkemu::Schedule::Reverse;
        else if (name == "random") s = hkemu::Schedule::Random;
        else throw std::invalid_argument("set_schedule: schedule must be forward, reverse or random, got " + name);
        hkemu::set_schedule(s, seed);
      },
      py::arg("schedule"), py::arg("seed") = 0,
      "Which runnable CUDA thread of a block the emulator runs next (see csrc/emu/emu.cpp).");
  m.def("schedule", [] {
    static const char* names[] = {"forward", "reverse", "random"};
    return py::make_tuple(names[static_cast<int>(hkemu::schedule())], hkemu::schedule_seed());
  });
  m.def("multiprocessor_count", &hkemu::multiprocessor_count, "SMs of the emulated device (one row block each).");
  m.def("stats", [] {
    const hkemu::Stats s = hkemu::stats();
    py::dict d;
    d["launches"] = s.launches, d["blocks"] = s.blocks, d["switches"] = s.switches;
    d["barriers"] = s.barriers, d["shuffles"] = s.shuffles;
    return d;
  });
  m.def("selftest", &hkemu::selftest, py::arg("kernel"),
        "Runs one of csrc/emu/selftest.cpp's kernels (known bugs, and one correct block sum).");
#endif
}

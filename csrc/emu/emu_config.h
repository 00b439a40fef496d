// The run-time controls of the CUDA host emulation (emu.cpp), for the binding and the tests.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace hkemu {

// Which runnable fiber of a block goes next: the lowest thread index, the highest, or a seeded
// pseudo-random one (a different order every launch and every pick).
enum class Schedule : int { Forward = 0, Reverse = 1, Random = 2 };

struct Stats {
  uint64_t launches = 0, blocks = 0, switches = 0, barriers = 0, shuffles = 0;
};

void set_schedule(Schedule s, uint64_t seed);
Schedule schedule();
uint64_t schedule_seed();
int multiprocessor_count();  // the emulated device's SMs, each holding one block of a row kernel
Stats stats();

// Runs one of selftest.cpp's small kernels (one block of 256 threads) and returns its output.
std::vector<double> selftest(const std::string& name);

}  // namespace hkemu

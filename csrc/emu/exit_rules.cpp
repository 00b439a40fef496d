// The unchanged CUDA source of exit_rules, compiled by g++ against the host emulation (cuda_runtime.h).
#include "../exit_rules.cu"

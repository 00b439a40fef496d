// The unchanged CUDA source of verify_step, compiled by g++ against the host emulation (cuda_runtime.h).
#include "../verify_step.cu"

// The unchanged CUDA source of decode_step, compiled by g++ against the host emulation (cuda_runtime.h).
#include "../decode_step.cu"

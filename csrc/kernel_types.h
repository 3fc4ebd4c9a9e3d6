// Plain types shared by the CPU kernels of every instruction set and the CUDA kernels (no ATen here, so the
// AVX2 translation unit can include it without compiling any ATen code for AVX2).
#pragma once

#include <array>
#include <cstdint>

namespace latentdiff {

// Host scalars of one reverse step, in float32 as the kernels compute.
struct StepCoefs {
  float p, q, guidance, a, b, c, d, clamp;
};

// Which optional terms a step has, as template bits of the CPU kernels: the loop body then has no branches, so
// the compiler keeps every vector in registers (with runtime branches it spilled them and ran several x slower).
enum StepTerms : int { kCfg = 1, kXIn = 2, kDPrev = 4, kNoise = 8, kClamp = 16, kAllTerms = 32 };

template <typename T>
using QSampleSpan = void (*)(const T* x0, const T* eps, T* xt, T* target, int64_t prediction, float a, float s,
                             int64_t n);
template <typename T>
using StepSpan = void (*)(const T* x, const T* out, const T* out_cond, const T* d_prev, const T* noise,
                          const T* x_in, T* x_next, T* denoised, StepCoefs k, int64_t n);

// The CPU kernels compiled for one instruction set: ops.cpp picks the widest one the CPU runs.
template <typename T>
struct CpuKernels {
  QSampleSpan<T> q_sample;
  std::array<StepSpan<T>, kAllTerms> step;  // indexed by StepTerms bits
};

}  // namespace latentdiff

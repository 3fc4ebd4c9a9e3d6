// The CPU kernels of cpu_kernels.h compiled for AVX2 + FMA (8-wide float vectors); ops.cpp uses them when the
// CPU has both, the baseline build otherwise. Only the vector headers and our kernels are compiled here, the
// way ATen builds its per-CPU-capability kernels, so the rest of the extension still runs on any x86-64.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// g++ does not define the feature macros for a target pragma (gcc does), and the ATen and Sleef headers select
// their AVX2 code by them, so define them as -mavx2 -mfma -mf16c would.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define LATENTDIFF_ISA avx2
#include "cpu_kernels.h"

namespace latentdiff::avx2 {
template CpuKernels<float> cpu_kernels<float>();
template CpuKernels<c10::Half> cpu_kernels<c10::Half>();
template CpuKernels<c10::BFloat16> cpu_kernels<c10::BFloat16>();
}  // namespace latentdiff::avx2
#endif

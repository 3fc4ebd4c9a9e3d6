// The CPU kernels of cpu_kernels.h compiled for AVX2 + FMA (8-wide float vectors); ops.cpp uses them when the
// CPU has both, the baseline build otherwise. Only the vector headers and our kernels are compiled here, the
// way ATen builds its per-CPU-capability kernels, so the rest of the extension still runs on any x86-64.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
// Everything that is not AVX2 code is parsed before the target pragma, which applies to every function declared
// after it. Parsed after it, g++ 13 compiled local AVX2-targeted copies of libstdc++ templates that c10's headers
// use (std::ostream::_M_insert<long>, behind every TORCH_CHECK message that prints a shape) instead of taking
// libstdc++'s; the extension then resolved the whole library's calls to those copies, and formatting such a
// message crashed the process (SIGSEGV in _M_insert<long> inside _C.abi3.so, seen under cuda-gdb on the H200's
// image: Ubuntu 24.04, g++ 13.3, torch 2.11). g++ 12 emits no copy, which is why no CPU machine here showed it.
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <iostream>
#include <locale>
#include <memory>
#include <ostream>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

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

// The CPU kernels as templates over raw pointers, written once with at::vec::Vectorized and compiled once per
// instruction set: ops.cpp includes this file for the baseline build, ops_avx2.cpp for AVX2 + FMA. The includer
// defines LATENTDIFF_ISA, the namespace that keeps the two copies apart (as ATen's CPU_CAPABILITY does).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>

#include "kernel_types.h"

#ifndef LATENTDIFF_ISA
#error "define LATENTDIFF_ISA (the instruction-set namespace) before including cpu_kernels.h"
#endif

namespace latentdiff::LATENTDIFF_ISA {

using Vf = at::vec::Vectorized<float>;

// Elements per loop iteration: two float vectors, which is one vector of a 16-bit dtype.
constexpr int64_t kLanes = 2 * Vf::size();

template <typename T>
inline void load2(const T* p, Vf& lo, Vf& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo = Vf::loadu(p);
    hi = Vf::loadu(p + Vf::size());
  } else {
    std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

template <typename T>
inline void store2(T* p, const Vf& lo, const Vf& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo.store(p);
    hi.store(p + Vf::size());
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(p);
  }
}

// ---------------------------------------------------------------------------------------------
// q_sample: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (Ho et al. 2020, eq. 4), and optionally the
// training target: eps, x0, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, sec. 4).

template <typename T>
void q_sample_span(const T* x0, const T* eps, T* xt, T* target, int64_t prediction, float a, float s, int64_t n) {
  const Vf va(a), vs(s);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Vf x_lo, x_hi, e_lo, e_hi;
    load2(x0 + i, x_lo, x_hi);
    load2(eps + i, e_lo, e_hi);
    store2(xt + i, va * x_lo + vs * e_lo, va * x_hi + vs * e_hi);
    if (target != nullptr) {
      if (prediction == 0) {
        store2(target + i, e_lo, e_hi);
      } else if (prediction == 1) {
        store2(target + i, x_lo, x_hi);
      } else {
        store2(target + i, va * e_lo - vs * x_lo, va * e_hi - vs * x_hi);
      }
    }
  }
  for (; i < n; ++i) {
    const float x = static_cast<float>(x0[i]), e = static_cast<float>(eps[i]);
    xt[i] = static_cast<T>(a * x + s * e);
    if (target != nullptr) {
      target[i] = prediction == 0 ? eps[i] : prediction == 1 ? x0[i] : static_cast<T>(a * e - s * x);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// sampler_step: one reverse update of any sampler as one linear combination (see sampler_step_ref in ops.py):
//   g = out, or u + guidance (k - u) for classifier-free guidance (Ho & Salimans 2022, eq. 6)
//   D = clamp(p x_in + q g)            the denoised estimate for the prediction type
//   x_next = a x + b D + c D_prev + d noise

template <typename T, int kTerms>
void step_span(const T* x, const T* out, const T* out_cond, const T* d_prev, const T* noise, const T* x_in, T* x_next,
               T* denoised, const StepCoefs k, int64_t n) {
  const Vf vp(k.p), vq(k.q), vg(k.guidance), va(k.a), vb(k.b), vc(k.c), vd(k.d), lo(-k.clamp), hi(k.clamp);
  // One half-block: xv, gv, kv, iv, pv, zv are x, out, out_cond, x_in, d_prev, noise in float32.
  auto combine = [&](Vf xv, Vf gv, Vf kv, Vf iv, Vf pv, Vf zv, Vf& D, Vf& xn) {
    if constexpr (kTerms & kCfg) gv = gv + vg * (kv - gv);
    D = vp * ((kTerms & kXIn) ? iv : xv) + vq * gv;
    if constexpr (kTerms & kClamp) D = at::vec::clamp(D, lo, hi);
    xn = va * xv + vb * D;
    if constexpr (kTerms & kDPrev) xn = xn + vc * pv;
    if constexpr (kTerms & kNoise) xn = xn + vd * zv;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Vf x0, x1, g0, g1, k0, k1, i0, i1, p0, p1, z0, z1, D0, D1, n0, n1;
    load2(x + i, x0, x1);
    load2(out + i, g0, g1);
    if constexpr (kTerms & kCfg) load2(out_cond + i, k0, k1);
    if constexpr (kTerms & kXIn) load2(x_in + i, i0, i1);
    if constexpr (kTerms & kDPrev) load2(d_prev + i, p0, p1);
    if constexpr (kTerms & kNoise) load2(noise + i, z0, z1);
    combine(x0, g0, k0, i0, p0, z0, D0, n0);
    combine(x1, g1, k1, i1, p1, z1, D1, n1);
    store2(denoised + i, D0, D1);
    store2(x_next + i, n0, n1);
  }
  for (; i < n; ++i) {
    const float xv = static_cast<float>(x[i]);
    float g = static_cast<float>(out[i]);
    if constexpr (kTerms & kCfg) g = g + k.guidance * (static_cast<float>(out_cond[i]) - g);
    float D = k.p * ((kTerms & kXIn) ? static_cast<float>(x_in[i]) : xv) + k.q * g;
    if constexpr (kTerms & kClamp) D = std::min(std::max(D, -k.clamp), k.clamp);
    float xn = k.a * xv + k.b * D;
    if constexpr (kTerms & kDPrev) xn += k.c * static_cast<float>(d_prev[i]);
    if constexpr (kTerms & kNoise) xn += k.d * static_cast<float>(noise[i]);
    denoised[i] = static_cast<T>(D);
    x_next[i] = static_cast<T>(xn);
  }
}

template <typename T, int... kTerms>
constexpr std::array<StepSpan<T>, kAllTerms> step_table(std::integer_sequence<int, kTerms...>) {
  return {&step_span<T, kTerms>...};
}

template <typename T>
CpuKernels<T> cpu_kernels() {
  return {&q_sample_span<T>, step_table<T>(std::make_integer_sequence<int, kAllTerms>{})};
}

}  // namespace latentdiff::LATENTDIFF_ISA

// Argument checks of every op, for CPU and CUDA tensors alike (ops.cpp runs them before any kernel runner), so both
// devices reject the same mistakes with the same message. Every message names the argument, what was expected, and
// how to fix it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <string>

#include "dispatch.h"
#include "kernel_types.h"

namespace latentdiff {

// Messages are built as one std::string, numbers through std::to_string, and thrown as they are (LATENTDIFF_CHECK),
// so a user's mistake never runs iostream formatting in this library. On the H200's image (Ubuntu 24.04, CC and CXX
// /opt/gcc/bin/g++) the link put a copy of libstdc++'s std::ostream::_M_insert<long> into _C.abi3.so (none of the
// object files had one; -Bsymbolic-functions then bound this library's calls to it), and that copy crashed on the
// process's stream objects: SIGSEGV while TORCH_CHECK printed a shape into its message, seen under cuda-gdb in the
// first test that fed a CUDA op a mis-shaped `out`. The CPU ops crash there the same way; g++ 12 here links no copy.
inline void put(std::string& s, const char* x) { s += x; }
inline void put(std::string& s, const std::string& x) { s += x; }
inline void put(std::string& s, int64_t x) { s += std::to_string(x); }
inline void put(std::string& s, at::ScalarType x) { s += c10::toString(x); }
inline void put(std::string& s, const at::Device& x) { s += x.str(); }
inline void put(std::string& s, at::IntArrayRef x) {
  s += "[";
  for (size_t i = 0; i < x.size(); ++i) s += (i ? ", " : "") + std::to_string(x[i]);
  s += "]";
}

template <typename... Args>
std::string text(const Args&... args) {
  std::string s;
  (put(s, args), ...);
  return s;
}

// TORCH_CHECK's message goes through c10::str, which streams even a single std::string argument into an
// ostringstream; this throws the same c10::Error (RuntimeError in Python) with the message already built.
#define LATENTDIFF_CHECK(cond, ...)                                 \
  if (C10_UNLIKELY(!(cond))) {                                      \
    C10_THROW_ERROR(Error, ::latentdiff::text(__VA_ARGS__));        \
  }

inline void check_float_dtype(const at::Tensor& x, const char* name) {
  auto s = x.scalar_type();
  LATENTDIFF_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "latentdiff: ", name,
                   " must be float32, float16 or bfloat16 (got ", s, "); convert it with .float()");
}

inline void check_like(const at::Tensor& y, const char* name, const at::Tensor& x, const char* xname) {
  LATENTDIFF_CHECK(y.device() == x.device(), "latentdiff: ", name, " is on ", y.device(), " but ", xname, " is on ",
                   x.device(), "; move it with .to(", xname, ".device)");
  LATENTDIFF_CHECK(y.scalar_type() == x.scalar_type(), "latentdiff: ", name, " is ", y.scalar_type(), " but ", xname,
                   " is ", x.scalar_type(), "; convert it with .to(", xname, ".dtype)");
  LATENTDIFF_CHECK(y.sizes() == x.sizes(), "latentdiff: ", name, " has shape ", y.sizes(), " but ", xname,
                   " has shape ", x.sizes(), "; they must match");
}

// q_sample / q_sample_target: x0 (B, ...), noise like x0, t int64 (B,), tables 1-D float32 on x0's device.
// The range of t is checked where the values are read (on the host for CPU, by a device assert on CUDA,
// so a CUDA call never waits for the GPU).
inline void check_q_sample(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& t,
                           const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1m_ab) {
  check_float_dtype(x0, "x0");
  LATENTDIFF_CHECK(x0.dim() >= 1, "latentdiff: x0 must have a batch dimension (got a 0-d tensor)");
  check_like(noise, "noise", x0, "x0");
  LATENTDIFF_CHECK(t.scalar_type() == at::kLong, "latentdiff: t must be int64 (got ", t.scalar_type(),
                   "); use t.long()");
  LATENTDIFF_CHECK(t.dim() == 1 && t.size(0) == x0.size(0),
                   "latentdiff: t must hold one timestep per batch row, shape (", x0.size(0), ",), got shape ",
                   t.sizes());
  LATENTDIFF_CHECK(t.device() == x0.device(), "latentdiff: t is on ", t.device(), " but x0 is on ", x0.device(),
                   "; move it with t.to(x0.device)");
  for (auto [tab, name] : {std::pair{&sqrt_ab, "sqrt_ab"}, std::pair{&sqrt_1m_ab, "sqrt_1m_ab"}}) {
    LATENTDIFF_CHECK(tab->scalar_type() == at::kFloat, "latentdiff: ", name, " must be a float32 table (got ",
                     tab->scalar_type(), "); use Schedule.tables(device)");
    LATENTDIFF_CHECK(tab->dim() == 1, "latentdiff: ", name, " must be 1-D (got shape ", tab->sizes(), ")");
    LATENTDIFF_CHECK(tab->device() == x0.device(), "latentdiff: ", name, " is on ", tab->device(), " but x0 is on ",
                     x0.device(), "; use Schedule.tables(x0.device)");
  }
  LATENTDIFF_CHECK(sqrt_ab.size(0) == sqrt_1m_ab.size(0), "latentdiff: sqrt_ab has ", sqrt_ab.size(0),
                   " entries but sqrt_1m_ab has ", sqrt_1m_ab.size(0), "; both come from the same schedule");
  LATENTDIFF_CHECK(sqrt_ab.size(0) > 0, "latentdiff: the schedule tables are empty");
}

inline void check_prediction(int64_t prediction) {
  LATENTDIFF_CHECK(prediction >= 0 && prediction <= 2, "latentdiff: prediction must be 0 (epsilon), 1 (sample) or ",
                   "2 (v_prediction), got ", prediction);
}

// sampler_step: x (B, ...); out like x, or (2B, ...) with cfg; optional tensors like x.
inline void check_sampler_step(const at::Tensor& x, const at::Tensor& out, const std::optional<at::Tensor>& d_prev,
                               const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& x_in,
                               bool cfg) {
  check_float_dtype(x, "x");
  LATENTDIFF_CHECK(x.dim() >= 1, "latentdiff: x must have a batch dimension (got a 0-d tensor)");
  LATENTDIFF_CHECK(out.device() == x.device(), "latentdiff: the model output is on ", out.device(), " but x is on ",
                   x.device(), "; move it with .to(x.device)");
  LATENTDIFF_CHECK(out.scalar_type() == x.scalar_type(), "latentdiff: the model output is ", out.scalar_type(),
                   " but x is ", x.scalar_type(), "; convert it with .to(x.dtype)");
  if (cfg) {
    auto want = x.sizes().vec();
    want[0] *= 2;
    LATENTDIFF_CHECK(out.sizes() == at::IntArrayRef(want), "latentdiff: with guidance the model output must stack the ",
                     "unconditional and conditional halves along the batch, shape ", at::IntArrayRef(want), ", got ",
                     out.sizes());
  } else {
    LATENTDIFF_CHECK(out.sizes() == x.sizes(), "latentdiff: the model output has shape ", out.sizes(),
                     " but x has shape ", x.sizes(),
                     "; pass guidance= if it stacks unconditional and conditional halves");
  }
  if (d_prev) check_like(*d_prev, "d_prev", x, "x");
  if (noise) check_like(*noise, "noise", x, "x");
  if (x_in) check_like(*x_in, "x_in", x, "x");
}

// The out= overload writes into a caller's buffer (reused across calls, it avoids the page faults of a fresh
// allocation, which dominate large CPU outputs): it must already have x0's shape, dtype and device, densely.
inline void check_out(const at::Tensor& out, const at::Tensor& x0, const at::Tensor& noise) {
  check_like(out, "out", x0, "x0");
  LATENTDIFF_CHECK(out.is_contiguous(), "latentdiff: out must be contiguous; pass torch.empty_like(x0) or x0.clone()");
  at::assert_no_partial_overlap(out, x0);
  at::assert_no_partial_overlap(out, noise);
}

inline StepCoefs step_coefs(double p, double q, double guidance, double a, double b, double c, double d, double clamp) {
  return {static_cast<float>(p), static_cast<float>(q), static_cast<float>(guidance), static_cast<float>(a),
          static_cast<float>(b), static_cast<float>(c), static_cast<float>(d),        static_cast<float>(clamp)};
}

}  // namespace latentdiff

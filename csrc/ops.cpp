// latentdiff._C: op schemas, the CPU kernels and their registration, and the (empty) Python module.
//
// Importing latentdiff._C runs the TORCH_LIBRARY blocks below, which define torch.ops.latentdiff.*;
// with CUDA, the same entry points register for CUDA tensors and call the runners in cuda/ops.cu.
// Every kernel is a single pass over memory: read each input once, write each output once,
// and compute in float32 whatever the storage dtype (fp32 / fp16 / bf16).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "checks.h"
#define LATENTDIFF_ISA base
#include "cpu_kernels.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define LATENTDIFF_HAVE_AVX2 1
namespace latentdiff::avx2 {  // defined in ops_avx2.cpp
template <typename T>
CpuKernels<T> cpu_kernels();
}
#else
#define LATENTDIFF_HAVE_AVX2 0
#endif

namespace latentdiff {

#ifdef LATENTDIFF_CUDA
namespace cuda {  // the kernel runners of cuda/ops.cu, called after every check has passed
void q_sample_run(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& t, const at::Tensor& sqrt_ab,
                  const at::Tensor& sqrt_1m_ab, const at::Tensor& xt, const at::Tensor* target, int64_t prediction);
void sampler_step_run(const at::Tensor& x, const at::Tensor& out, const at::Tensor& d_prev, const at::Tensor& noise,
                      const at::Tensor& x_in, const StepCoefs& k, bool cfg, const at::Tensor& x_next,
                      const at::Tensor& denoised);
}  // namespace cuda
#endif

namespace {

// Work per thread below which splitting does not pay (64 KiB of fp32 per input).
constexpr int64_t kGrain = 16384;

// The widest kernels this CPU runs: AVX2 + FMA + F16C when the build has them and the CPU supports them.
// LATENTDIFF_CPU_ISA=base forces the baseline build (the tests use it to check both).
template <typename T>
const CpuKernels<T>& kernels() {
  static const CpuKernels<T> chosen = [] {
#if LATENTDIFF_HAVE_AVX2
    const char* want = std::getenv("LATENTDIFF_CPU_ISA");
    const bool base_only = want != nullptr && std::string_view(want) == "base";
    if (!base_only && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      return avx2::cpu_kernels<T>();
    }
#endif
    return base::cpu_kernels<T>();
  }();
  return chosen;
}

// A fresh output buffer. Large CPU buffers are fresh virtual memory (glibc maps anything above its 32 MiB mmap
// threshold anew), and faulting it in 4 KiB pages on first write costs several times the kernel itself
// (benchmarks/RESULTS.md). Asking for transparent huge pages before that first write cuts the faults 512-fold;
// it is a hint (ignored where THP is off), the same one c10 gives every buffer under THP_MEM_ALLOC_ENABLE=1.
at::Tensor new_output(const at::Tensor& like) {
  auto out = at::empty(like.sizes(), like.options());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + out.nbytes()) & ~(kHuge - 1);
  if (out.nbytes() >= 2 * kHuge && last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // best effort: errors change nothing
  }
#endif
  return out;
}

// Gathers the per-row coefficients on the host, where t is checked against the table length.
std::pair<std::vector<float>, std::vector<float>> row_coefficients(const at::Tensor& t, const at::Tensor& sqrt_ab,
                                                                   const at::Tensor& sqrt_1m_ab) {
  const auto tc = t.contiguous();
  const auto ac = sqrt_ab.contiguous(), sc = sqrt_1m_ab.contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  const float *ap = ac.data_ptr<float>(), *sp = sc.data_ptr<float>();
  const int64_t rows = t.size(0), steps = sqrt_ab.size(0);
  std::vector<float> a(rows), s(rows);
  for (int64_t b = 0; b < rows; ++b) {
    LATENTDIFF_CHECK(tp[b] >= 0 && tp[b] < steps, "latentdiff: t[", b, "] = ", tp[b],
                     " is out of range for a schedule of ",
                                                   steps, " steps (valid timesteps are 0..", steps - 1, ")");
    a[b] = ap[tp[b]];
    s[b] = sp[tp[b]];
  }
  return {std::move(a), std::move(s)};
}

void q_sample_run_cpu(const at::Tensor& x0_, const at::Tensor& noise_, const at::Tensor& t, const at::Tensor& sqrt_ab,
                      const at::Tensor& sqrt_1m_ab, const at::Tensor& xt, const at::Tensor* target,
                      int64_t prediction) {
  const auto x0 = x0_.contiguous(), noise = noise_.contiguous();
  const auto [a, s] = row_coefficients(t, sqrt_ab, sqrt_1m_ab);
  const int64_t numel = x0.numel();
  if (numel == 0) return;
  const int64_t inner = numel / x0.size(0);
  LATENTDIFF_DISPATCH(x0.scalar_type(), "q_sample_cpu", [&] {
    const scalar_t* xp = x0.const_data_ptr<scalar_t>();
    const scalar_t* ep = noise.const_data_ptr<scalar_t>();
    scalar_t* op = xt.mutable_data_ptr<scalar_t>();
    scalar_t* tp = target != nullptr ? target->mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      // A chunk may span several rows: walk it row segment by row segment.
      for (int64_t pos = begin, b = begin / inner; pos < end; ++b) {
        const int64_t stop = std::min((b + 1) * inner, end);
        kernels<scalar_t>().q_sample(xp + pos, ep + pos, op + pos, tp != nullptr ? tp + pos : nullptr, prediction, a[b],
                                s[b], stop - pos);
        pos = stop;
      }
    });
  });
}

void sampler_step_run_cpu(const at::Tensor& x, const at::Tensor& out, const at::Tensor& d_prev,
                          const at::Tensor& noise, const at::Tensor& x_in, const StepCoefs& k, bool cfg,
                          const at::Tensor& x_next, const at::Tensor& denoised) {
  const int64_t numel = x.numel();
  if (numel == 0) return;
  LATENTDIFF_DISPATCH(x.scalar_type(), "sampler_step_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    const T* op = out.const_data_ptr<T>();
    const T* kp = cfg ? op + numel : nullptr;  // conditional half follows the unconditional one
    const T* dp = d_prev.defined() ? d_prev.const_data_ptr<T>() : nullptr;
    const T* np = noise.defined() ? noise.const_data_ptr<T>() : nullptr;
    const T* ip = x_in.defined() ? x_in.const_data_ptr<T>() : nullptr;
    T* xn = x_next.mutable_data_ptr<T>();
    T* dn = denoised.mutable_data_ptr<T>();
    const int terms = (cfg ? kCfg : 0) | (ip != nullptr ? kXIn : 0) | (dp != nullptr ? kDPrev : 0) |
                      (np != nullptr ? kNoise : 0) | (k.clamp > 0 ? kClamp : 0);
    const StepSpan<T> span = kernels<T>().step[terms];
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      auto at_ = [begin](const T* ptr) { return ptr != nullptr ? ptr + begin : nullptr; };
      span(xp + begin, op + begin, at_(kp), at_(dp), at_(np), at_(ip), xn + begin, dn + begin, k, end - begin);
    });
  });
}


// Each op has one entry point for both devices: every check (and so every exception a user's mistake raises) runs
// here, before the device's kernel runner is called; the CUDA runners in cuda/ops.cu throw only if a launch fails.
void q_sample_run(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& t, const at::Tensor& sqrt_ab,
                  const at::Tensor& sqrt_1m_ab, const at::Tensor& xt, const at::Tensor* target, int64_t prediction) {
#ifdef LATENTDIFF_CUDA
  if (x0.is_cuda()) return cuda::q_sample_run(x0, noise, t, sqrt_ab, sqrt_1m_ab, xt, target, prediction);
#endif
  q_sample_run_cpu(x0, noise, t, sqrt_ab, sqrt_1m_ab, xt, target, prediction);
}

at::Tensor new_output_like(const at::Tensor& x) {
  return x.is_cuda() ? at::empty(x.sizes(), x.options()) : new_output(x);
}

at::Tensor q_sample(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& t, const at::Tensor& sqrt_ab,
                    const at::Tensor& sqrt_1m_ab) {
  check_q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab);
  auto xt = new_output_like(x0);
  q_sample_run(x0, noise, t, sqrt_ab, sqrt_1m_ab, xt, nullptr, 0);
  return xt;
}

void q_sample_into(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& t, const at::Tensor& sqrt_ab,
                   const at::Tensor& sqrt_1m_ab, const at::Tensor& out) {
  check_q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab);
  check_out(out, x0, noise);
  q_sample_run(x0, noise, t, sqrt_ab, sqrt_1m_ab, out, nullptr, 0);
}

std::tuple<at::Tensor, at::Tensor> q_sample_target(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& t,
                                                   const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1m_ab,
                                                   int64_t prediction) {
  check_q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab);
  check_prediction(prediction);
  auto xt = new_output_like(x0);
  auto target = new_output_like(x0);
  q_sample_run(x0, noise, t, sqrt_ab, sqrt_1m_ab, xt, &target, prediction);
  return {xt, target};
}

std::tuple<at::Tensor, at::Tensor> sampler_step(const at::Tensor& x_, const at::Tensor& out_,
                                                const std::optional<at::Tensor>& d_prev_,
                                                const std::optional<at::Tensor>& noise_,
                                                const std::optional<at::Tensor>& x_in_, double p, double q,
                                                double guidance, bool cfg, double a, double b, double c, double d,
                                                double clamp) {
  check_sampler_step(x_, out_, d_prev_, noise_, x_in_, cfg);
  const StepCoefs k = step_coefs(p, q, guidance, a, b, c, d, clamp);
  const auto x = x_.contiguous(), out = out_.contiguous();
  // Inputs whose coefficient is zero are not read, as in the reference (which skips those terms).
  const auto d_prev = (d_prev_ && c != 0) ? d_prev_->contiguous() : at::Tensor();
  const auto noise = (noise_ && d != 0) ? noise_->contiguous() : at::Tensor();
  const auto x_in = x_in_ ? x_in_->contiguous() : at::Tensor();
  auto x_next = new_output_like(x);
  auto denoised = new_output_like(x);
#ifdef LATENTDIFF_CUDA
  if (x.is_cuda()) {
    cuda::sampler_step_run(x, out, d_prev, noise, x_in, k, cfg, x_next, denoised);
    return {x_next, denoised};
  }
#endif
  sampler_step_run_cpu(x, out, d_prev, noise, x_in, k, cfg, x_next, denoised);
  return {x_next, denoised};
}

}  // namespace

TORCH_LIBRARY(latentdiff, m) {
  m.def("q_sample(Tensor x0, Tensor noise, Tensor t, Tensor sqrt_ab, Tensor sqrt_1m_ab) -> Tensor");
  // Writes x_t into a caller's buffer. It returns nothing, as custom ops that return an alias of an input
  // cannot be functionalized (torch.compile); the Python wrapper returns `out`.
  m.def("q_sample_into(Tensor x0, Tensor noise, Tensor t, Tensor sqrt_ab, Tensor sqrt_1m_ab, Tensor(a!) out) -> ()");
  m.def("q_sample_target(Tensor x0, Tensor noise, Tensor t, Tensor sqrt_ab, Tensor sqrt_1m_ab, int prediction) "
        "-> (Tensor, Tensor)");
  m.def("sampler_step(Tensor x, Tensor out, Tensor? d_prev, Tensor? noise, Tensor? x_in, float p, float q, "
        "float guidance, bool cfg, float a, float b, float c, float d, float clamp) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(latentdiff, CPU, m) {
  m.impl("q_sample", &q_sample);
  m.impl("q_sample_into", &q_sample_into);
  m.impl("q_sample_target", &q_sample_target);
  m.impl("sampler_step", &sampler_step);
}

#ifdef LATENTDIFF_CUDA
TORCH_LIBRARY_IMPL(latentdiff, CUDA, m) {
  m.impl("q_sample", &q_sample);
  m.impl("q_sample_into", &q_sample_into);
  m.impl("q_sample_target", &q_sample_target);
  m.impl("sampler_step", &sampler_step);
}
#endif

}  // namespace latentdiff

// The module has no Python functions: importing it is what registers the ops. Plain C API (no pybind11)
// keeps the extension within Py_LIMITED_API, so one build serves every CPython >= 3.9.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "latentdiff kernels; importing registers torch.ops.latentdiff.*", -1, nullptr};
  return PyModule_Create(&module_def);
}

// Fused CPU optimizer kernels: the maths, the ISA variants and the split across threads.
//
// Each kernel is one pass: per element it loads what it needs once, does every step of the
// update (and the weight prediction, if asked) in fp32 registers, and stores once. The
// element body is a template over the vector type V (simd.h) and the storage types P
// (param / predict_out) and G (grad); the vector loop and its scalar tail use the same body,
// hence the same op order and the same rounding. fp64 tensors get the same body compiled
// with a double V (fp64 maths, fp64 storage only): namespaces k_<isa>d.
#include "optim/fused_optim.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <vector>

#include "optim/simd.h"
#include "optim/thread_pool.h"

namespace pipetrain::optim {
namespace {

// Below this many elements per thread, waking a worker costs more than it saves.
constexpr int64_t kMinPerThread = 32768;
// Chunks start on multiples of 64 elements: no shared cache lines, aligned vector stores.
constexpr int64_t kAlign = 64;
// Write-only fp32 outputs of calls this large bypass the cache (non-temporal stores): the
// buffers exceed the last-level cache anyway, and it saves the read-for-ownership traffic.
constexpr int64_t kStreamMin = int64_t(1) << 21;

// The 3 x 3 storage-type combinations, chosen at run time inside each ISA variant (so
// every instantiation is compiled for that ISA).
#define PT_DISPATCH(V, FN, d1, d2, ...)                                   \
  switch ((d1) * 3 + (d2)) {                                             \
    case kF32 * 3 + kF32: FN<V, float, float>(__VA_ARGS__); break;       \
    case kF32 * 3 + kBF16: FN<V, float, BF16>(__VA_ARGS__); break;       \
    case kF32 * 3 + kF16: FN<V, float, _Float16>(__VA_ARGS__); break;    \
    case kBF16 * 3 + kF32: FN<V, BF16, float>(__VA_ARGS__); break;       \
    case kBF16 * 3 + kBF16: FN<V, BF16, BF16>(__VA_ARGS__); break;       \
    case kBF16 * 3 + kF16: FN<V, BF16, _Float16>(__VA_ARGS__); break;    \
    case kF16 * 3 + kF32: FN<V, _Float16, float>(__VA_ARGS__); break;    \
    case kF16 * 3 + kBF16: FN<V, _Float16, BF16>(__VA_ARGS__); break;    \
    case kF16 * 3 + kF16: FN<V, _Float16, _Float16>(__VA_ARGS__); break; \
    default: break;                                                      \
  }

// fp64: one storage type for everything.
#define PT_DISPATCH_F64(V, FN, d1, d2, ...) FN<V, double, double>(__VA_ARGS__)

using SgdFn = void (*)(const SgdArgs&, int64_t, int64_t, bool);
using AdamFn = void (*)(const AdamArgs&, int64_t, int64_t, bool);
using PredFn = void (*)(const PredictArgs&, int64_t, int64_t, bool);

struct Kernels {
  SgdFn sgd;
  AdamFn adam;
  PredFn sgd_predict;
  PredFn adam_predict;
};

struct Variant {
  const char* name;
  Kernels f32;  // fp32/bf16/fp16 storage, fp32 maths
  Kernels f64;  // fp64 storage and maths
};

}  // namespace

#define PT_BODY_DISPATCH(...) PT_DISPATCH(V, __VA_ARGS__)
namespace k_scalar {
#define PT_FENCE (void)0
using V = Scalar;
#include "optim/fused_body.inc"
#undef PT_FENCE
}  // namespace k_scalar
#undef PT_BODY_DISPATCH

#define PT_BODY_DISPATCH(...) PT_DISPATCH_F64(V, __VA_ARGS__)
namespace k_scalard {
#define PT_FENCE (void)0
using V = ScalarD;
#include "optim/fused_body.inc"
#undef PT_FENCE
}  // namespace k_scalard
#undef PT_BODY_DISPATCH

#if PT_X86
#define PT_FENCE _mm_sfence()
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define PT_BODY_DISPATCH(...) PT_DISPATCH(V, __VA_ARGS__)
namespace k_avx2 {
using V = Avx2;
#include "optim/fused_body.inc"
}  // namespace k_avx2
#undef PT_BODY_DISPATCH
#define PT_BODY_DISPATCH(...) PT_DISPATCH_F64(V, __VA_ARGS__)
namespace k_avx2d {
using V = Avx2D;
#include "optim/fused_body.inc"
}  // namespace k_avx2d
#undef PT_BODY_DISPATCH
#pragma GCC pop_options

// GCC 12's avx512fintrin.h initialises its "undefined" pass-through operands from
// themselves (`__m512 __Y = __Y;`), which -Wmaybe-uninitialized reports at every inlined
// intrinsic: a known false positive in the system header, silenced for this region only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define PT_BODY_DISPATCH(...) PT_DISPATCH(V, __VA_ARGS__)
namespace k_avx512 {
using V = Avx512;
#include "optim/fused_body.inc"
}  // namespace k_avx512
#undef PT_BODY_DISPATCH
#define PT_BODY_DISPATCH(...) PT_DISPATCH_F64(V, __VA_ARGS__)
namespace k_avx512d {
using V = Avx512D;
#include "optim/fused_body.inc"
}  // namespace k_avx512d
#undef PT_BODY_DISPATCH
#pragma GCC pop_options
#pragma GCC diagnostic pop
#undef PT_FENCE
#endif

namespace {

Variant pick_variant() {
#define PT_KERNELS(ns) Kernels{ns::sgd, ns::adam, ns::sgd_predict, ns::adam_predict}
  const Variant scalar{"scalar", PT_KERNELS(k_scalar), PT_KERNELS(k_scalard)};
#if PT_X86
  const Variant avx2{"avx2", PT_KERNELS(k_avx2), PT_KERNELS(k_avx2d)};
  const Variant avx512{"avx512", PT_KERNELS(k_avx512), PT_KERNELS(k_avx512d)};
#undef PT_KERNELS
  __builtin_cpu_init();
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool has512 = has2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  std::string want = std::getenv("PIPETRAIN_SIMD") ? std::getenv("PIPETRAIN_SIMD") : "";
  if (want == "scalar") return scalar;
  if (want == "avx2" && has2) return avx2;
  if (has512 && (want.empty() || want == "avx512")) return avx512;
  if (has2) return avx2;
#endif
  return scalar;
}

const Variant& variant() {
  static const Variant v = pick_variant();
  return v;
}

bool use_stream(const void* out, int out_dtype, int64_t n) {
  return out && (out_dtype == kF32 || out_dtype == kF64) && n >= kStreamMin &&
         reinterpret_cast<uintptr_t>(out) % 64 == 0;
}

void check_dtype(int d, const char* what) {
  if (d != kF32 && d != kBF16 && d != kF16 && d != kF64)
    throw std::invalid_argument(std::string(what) + " dtype code must be 0 (float32), 1 (bfloat16), "
                                "2 (float16) or 3 (float64), got " + std::to_string(d));
}

// fp64 is all-or-nothing: fp64 maths needs fp64 state, and the state pointers carry no type.
const Kernels& kernels_for(int d1, int d2, const char* what) {
  check_dtype(d1, what);
  check_dtype(d2, what);
  if ((d1 == kF64) != (d2 == kF64))
    throw std::invalid_argument(std::string(what) + ": float64 tensors mix only with float64");
  return d1 == kF64 ? variant().f64 : variant().f32;
}

void check_step(int64_t step) {
  if (step < 1) throw std::invalid_argument("adam_step: step must be >= 1 (the count after "
                                            "this update), got " + std::to_string(step));
}

// Runs fn(args[t], lo, hi) over every tensor's [0, n_t), the tensors' elements cut into
// chunks across the pool as one concatenated range (chunk bounds depend only on the sizes).
template <class Args, class Fn>
void run_multi(const Args* a, int64_t count, const Fn& fn) {
  std::vector<int64_t> start(size_t(count) + 1, 0);
  for (int64_t t = 0; t < count; ++t) start[t + 1] = start[t] + a[t].n;
  ThreadPool::instance().parallel_for(start[count], kAlign, kMinPerThread, [&](int64_t b, int64_t e) {
    // The last tensor starting at or before b, then every tensor overlapping [b, e).
    int64_t t = std::upper_bound(start.begin(), start.end(), b) - start.begin() - 1;
    for (; t < count && start[t] < e; ++t) {
      const int64_t lo = std::max(b, start[t]) - start[t];
      const int64_t hi = std::min(e, start[t + 1]) - start[t];
      if (lo < hi) fn(a[t], lo, hi);
    }
  });
}

}  // namespace

void sgd_step(const SgdArgs& a, const float* found_inf) {
  const SgdFn fn = kernels_for(a.param_dtype, a.grad_dtype, "sgd_step").sgd;
  if (found_inf && *found_inf != 0.0f) return;
  const bool nt = use_stream(a.predict_out, a.param_dtype, a.n);
  ThreadPool::instance().parallel_for(a.n, kAlign, kMinPerThread,
                                      [&](int64_t b, int64_t e) { fn(a, b, e, nt); });
}

void adam_step(const AdamArgs& a, const float* found_inf) {
  const AdamFn fn = kernels_for(a.param_dtype, a.grad_dtype, "adam_step").adam;
  check_step(a.step);
  if (found_inf && *found_inf != 0.0f) return;
  const bool nt = use_stream(a.predict_out, a.param_dtype, a.n);
  ThreadPool::instance().parallel_for(a.n, kAlign, kMinPerThread,
                                      [&](int64_t b, int64_t e) { fn(a, b, e, nt); });
}

void sgd_predict(const PredictArgs& a) {
  const PredFn fn = kernels_for(a.param_dtype, a.out_dtype, "sgd_predict").sgd_predict;
  const bool nt = use_stream(a.out, a.out_dtype, a.n);
  ThreadPool::instance().parallel_for(a.n, kAlign, kMinPerThread,
                                      [&](int64_t b, int64_t e) { fn(a, b, e, nt); });
}

void adam_predict(const PredictArgs& a) {
  const PredFn fn = kernels_for(a.param_dtype, a.out_dtype, "adam_predict").adam_predict;
  if (a.step < 0) throw std::invalid_argument("adam_predict: step must be >= 0");
  const bool nt = use_stream(a.out, a.out_dtype, a.n);
  ThreadPool::instance().parallel_for(a.n, kAlign, kMinPerThread,
                                      [&](int64_t b, int64_t e) { fn(a, b, e, nt); });
}

// The list forms: every Args is checked before anything is written. No streaming stores
// (a chunk may start anywhere inside a tensor, and these tensors are small).
void sgd_step_multi(const SgdArgs* a, int64_t count, const float* found_inf) {
  if (count <= 0) return;
  const SgdFn fn = kernels_for(a[0].param_dtype, a[0].grad_dtype, "sgd_step_multi").sgd;
  for (int64_t t = 1; t < count; ++t)
    if (a[t].param_dtype != a[0].param_dtype || a[t].grad_dtype != a[0].grad_dtype)
      throw std::invalid_argument("sgd_step_multi: every tensor of a call has the same dtypes");
  if (found_inf && *found_inf != 0.0f) return;
  run_multi(a, count, [&](const SgdArgs& x, int64_t b, int64_t e) { fn(x, b, e, false); });
}

void adam_step_multi(const AdamArgs* a, int64_t count, const float* found_inf) {
  if (count <= 0) return;
  const AdamFn fn = kernels_for(a[0].param_dtype, a[0].grad_dtype, "adam_step_multi").adam;
  for (int64_t t = 0; t < count; ++t) {
    if (a[t].param_dtype != a[0].param_dtype || a[t].grad_dtype != a[0].grad_dtype)
      throw std::invalid_argument("adam_step_multi: every tensor of a call has the same dtypes");
    check_step(a[t].step);
  }
  if (found_inf && *found_inf != 0.0f) return;
  run_multi(a, count, [&](const AdamArgs& x, int64_t b, int64_t e) { fn(x, b, e, false); });
}

void sgd_predict_multi(const PredictArgs* a, int64_t count) {
  if (count <= 0) return;
  const PredFn fn = kernels_for(a[0].param_dtype, a[0].out_dtype, "sgd_predict_multi").sgd_predict;
  for (int64_t t = 1; t < count; ++t)
    if (a[t].param_dtype != a[0].param_dtype || a[t].out_dtype != a[0].out_dtype)
      throw std::invalid_argument("sgd_predict_multi: every tensor of a call has the same dtypes");
  run_multi(a, count, [&](const PredictArgs& x, int64_t b, int64_t e) { fn(x, b, e, false); });
}

void adam_predict_multi(const PredictArgs* a, int64_t count) {
  if (count <= 0) return;
  const PredFn fn =
      kernels_for(a[0].param_dtype, a[0].out_dtype, "adam_predict_multi").adam_predict;
  for (int64_t t = 0; t < count; ++t) {
    if (a[t].param_dtype != a[0].param_dtype || a[t].out_dtype != a[0].out_dtype)
      throw std::invalid_argument("adam_predict_multi: every tensor of a call has the same dtypes");
    if (a[t].step < 0) throw std::invalid_argument("adam_predict_multi: step must be >= 0");
  }
  run_multi(a, count, [&](const PredictArgs& x, int64_t b, int64_t e) { fn(x, b, e, false); });
}

std::string simd_level() { return variant().name; }

}  // namespace pipetrain::optim

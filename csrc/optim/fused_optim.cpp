// Fused CPU optimizer kernels: the maths, the ISA variants and the split across threads.
//
// Each kernel is one pass: per element it loads what it needs once, does every step of the
// update (and the weight prediction, if asked) in fp32 registers, and stores once. The
// element body is a template over the vector type V (simd.h) and the storage types P
// (param / predict_out) and G (grad); the vector loop and its scalar tail use the same body,
// hence the same op order and the same rounding.
#include "optim/fused_optim.h"

#include <cmath>
#include <cstdlib>
#include <functional>
#include <stdexcept>

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

using SgdFn = void (*)(const SgdArgs&, int64_t, int64_t, bool);
using AdamFn = void (*)(const AdamArgs&, int64_t, int64_t, bool);
using PredFn = void (*)(const PredictArgs&, int64_t, int64_t, bool);

struct Variant {
  const char* name;
  SgdFn sgd;
  AdamFn adam;
  PredFn sgd_predict;
  PredFn adam_predict;
};

}  // namespace

namespace k_scalar {
#define PT_FENCE (void)0
using V = Scalar;
#include "optim/fused_body.inc"
#undef PT_FENCE
}  // namespace k_scalar

#if PT_X86
#define PT_FENCE _mm_sfence()
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace k_avx2 {
using V = Avx2;
#include "optim/fused_body.inc"
}  // namespace k_avx2
#pragma GCC pop_options

// GCC 12's avx512fintrin.h initialises its "undefined" pass-through operands from
// themselves (`__m512 __Y = __Y;`), which -Wmaybe-uninitialized reports at every inlined
// intrinsic: a known false positive in the system header, silenced for this region only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace k_avx512 {
using V = Avx512;
#include "optim/fused_body.inc"
}  // namespace k_avx512
#pragma GCC pop_options
#pragma GCC diagnostic pop
#undef PT_FENCE
#endif

namespace {

Variant pick_variant() {
  const Variant scalar{"scalar", k_scalar::sgd, k_scalar::adam, k_scalar::sgd_predict,
                       k_scalar::adam_predict};
#if PT_X86
  const Variant avx2{"avx2", k_avx2::sgd, k_avx2::adam, k_avx2::sgd_predict,
                     k_avx2::adam_predict};
  const Variant avx512{"avx512", k_avx512::sgd, k_avx512::adam, k_avx512::sgd_predict,
                       k_avx512::adam_predict};
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
  return out && out_dtype == kF32 && n >= kStreamMin &&
         reinterpret_cast<uintptr_t>(out) % 64 == 0;
}

void check_dtype(int d, const char* what) {
  if (d != kF32 && d != kBF16 && d != kF16)
    throw std::invalid_argument(std::string(what) + " dtype code must be 0 (float32), 1 (bfloat16) "
                                "or 2 (float16), got " + std::to_string(d));
}

}  // namespace

void sgd_step(const SgdArgs& a, const float* found_inf) {
  check_dtype(a.param_dtype, "param");
  check_dtype(a.grad_dtype, "grad");
  if (found_inf && *found_inf != 0.0f) return;
  const bool nt = use_stream(a.predict_out, a.param_dtype, a.n);
  const SgdFn fn = variant().sgd;
  ThreadPool::instance().parallel_for(a.n, kAlign, kMinPerThread,
                                      [&](int64_t b, int64_t e) { fn(a, b, e, nt); });
}

void adam_step(const AdamArgs& a, const float* found_inf) {
  check_dtype(a.param_dtype, "param");
  check_dtype(a.grad_dtype, "grad");
  if (a.step < 1) throw std::invalid_argument("adam_step: step must be >= 1 (the count after "
                                              "this update), got " + std::to_string(a.step));
  if (found_inf && *found_inf != 0.0f) return;
  const bool nt = use_stream(a.predict_out, a.param_dtype, a.n);
  const AdamFn fn = variant().adam;
  ThreadPool::instance().parallel_for(a.n, kAlign, kMinPerThread,
                                      [&](int64_t b, int64_t e) { fn(a, b, e, nt); });
}

void sgd_predict(const PredictArgs& a) {
  check_dtype(a.param_dtype, "param");
  check_dtype(a.out_dtype, "out");
  const bool nt = use_stream(a.out, a.out_dtype, a.n);
  const PredFn fn = variant().sgd_predict;
  ThreadPool::instance().parallel_for(a.n, kAlign, kMinPerThread,
                                      [&](int64_t b, int64_t e) { fn(a, b, e, nt); });
}

void adam_predict(const PredictArgs& a) {
  check_dtype(a.param_dtype, "param");
  check_dtype(a.out_dtype, "out");
  if (a.step < 0) throw std::invalid_argument("adam_predict: step must be >= 0");
  const bool nt = use_stream(a.out, a.out_dtype, a.n);
  const PredFn fn = variant().adam_predict;
  ThreadPool::instance().parallel_for(a.n, kAlign, kMinPerThread,
                                      [&](int64_t b, int64_t e) { fn(a, b, e, nt); });
}

std::string simd_level() { return variant().name; }

}  // namespace pipetrain::optim

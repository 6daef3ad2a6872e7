// Fused CPU optimizer kernels (SGD-momentum, Adam/AdamW, weight prediction), torch-free.
//
// Semantics are those of kernels/reference.py (CONTRACTS.md §3): every buffer is a flat,
// contiguous array of n elements; param is fp32/bf16/fp16, grad fp32/bf16/fp16, state and
// master fp32, all maths in fp32 — or everything (param, grad, state, outputs) is fp64 and so
// is the maths (no master weights then). State pointers are untyped: float* or double*.
// One call is one pass over memory, split across the
// ThreadPool; within a thread the loop runs AVX-512, AVX2 or scalar code (chosen once).
#pragma once

#include <cstdint>
#include <string>

namespace pipetrain::optim {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

struct SgdArgs {
  void* param = nullptr;        // n x param_dtype, updated in place (= rounded master if given)
  int param_dtype = kF32;
  const void* grad = nullptr;   // n x grad_dtype
  int grad_dtype = kF32;
  void* momentum_buf = nullptr;  // n x fp32 (fp64 with fp64 param), or null when momentum == 0
  void* master = nullptr;       // n x fp32 master weights, or null (always null for fp64)
  void* predict_out = nullptr;  // n x param_dtype: w_new - predict_s*lr*buf_new, or null
  int64_t n = 0;
  double lr = 0, momentum = 0, dampening = 0, weight_decay = 0, predict_s = 0;
  bool nesterov = false, maximize = false, first_step = false;
};

struct AdamArgs {
  void* param = nullptr;
  int param_dtype = kF32;
  const void* grad = nullptr;
  int grad_dtype = kF32;
  void* exp_avg = nullptr;      // n x fp32 (fp64 with fp64 param)
  void* exp_avg_sq = nullptr;   // n x fp32 (fp64 with fp64 param)
  void* master = nullptr;       // n x fp32, or null (always null for fp64)
  void* predict_out = nullptr;  // n x param_dtype: w_new - s*lr*mhat/(sqrt(vhat)+eps), or null
  int64_t n = 0;
  double lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0, predict_s = 0;
  bool decoupled = false, maximize = false;
  int64_t step = 1;  // count AFTER this update (1 on the first step)
};

struct PredictArgs {
  const void* param = nullptr;  // n x param_dtype (may be an fp32 master)
  int param_dtype = kF32;
  const void* exp_avg = nullptr;     // SGD: the momentum buffer (null -> out = w); Adam: m
  const void* exp_avg_sq = nullptr;  // Adam only: v   (both fp32, or fp64 with fp64 param)
  void* out = nullptr;          // n x out_dtype
  int out_dtype = kF32;
  int64_t n = 0;
  double s = 0, lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  int64_t step = 0;             // Adam: step 0 -> out = w
};

// found_inf: null, or a pointer to one fp32; nonzero makes the whole call a no-op.
void sgd_step(const SgdArgs& a, const float* found_inf);
void adam_step(const AdamArgs& a, const float* found_inf);
void sgd_predict(const PredictArgs& a);
void adam_predict(const PredictArgs& a);

// The same over a list of `count` tensors (one Args each, same options, each its own n and,
// for Adam, its own step) in one call: the tensors' elements are cut into chunks across the
// ThreadPool as if they were one buffer, so many small tensors cost one parallel pass (no
// per-tensor call or thread wake-up). Every Args of a call has the same dtypes.
void sgd_step_multi(const SgdArgs* a, int64_t count, const float* found_inf);
void adam_step_multi(const AdamArgs* a, int64_t count, const float* found_inf);
void sgd_predict_multi(const PredictArgs* a, int64_t count);
void adam_predict_multi(const PredictArgs* a, int64_t count);

// "avx512", "avx2" or "scalar": the code path every call takes (PIPETRAIN_SIMD overrides).
std::string simd_level();

}  // namespace pipetrain::optim

// Binds the fused CPU optimizer kernels into pipetrain._C.optim.
//
// Torch-free: tensors arrive as raw addresses (tensor.data_ptr(), 0 meaning "absent") plus
// dtype codes (0 float32, 1 bfloat16, 2 float16, 3 float64); engine/_cpu_kernels.py
// validates the tensors (device, contiguity, numel, dtype) before calling. The GIL is released
// for the whole kernel, so pipeline stages on other threads keep running. The *_multi forms
// take one list entry per tensor (addresses, numels, per-tensor flags); an empty list means
// "absent for every tensor", a 0 address "absent for this one".
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "bindings.h"
#include "optim/fused_optim.h"
#include "optim/thread_pool.h"

namespace py = pybind11;

namespace pipetrain {
namespace {

template <class T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

using Addrs = std::vector<uintptr_t>;

// Adam's step counters: torch keeps them as 0-d float tensors (fp32, or fp64 when the default
// dtype is). Reading and bumping them here spares Python a tensor op per parameter per step.
int64_t read_counter(uintptr_t address, bool f64) {
  return f64 ? int64_t(*ptr<const double>(address)) : int64_t(*ptr<const float>(address));
}

void write_counter(uintptr_t address, bool f64, int64_t value) {
  if (f64) *ptr<double>(address) = double(value); else *ptr<float>(address) = float(value);
}

// Entry t of an optional per-tensor list (empty: absent everywhere).
uintptr_t at(const Addrs& v, size_t t) { return v.empty() ? 0 : v[t]; }

void check_lengths(size_t n, std::initializer_list<const Addrs*> lists, const char* what) {
  for (const Addrs* l : lists)
    if (!l->empty() && l->size() != n)
      throw std::invalid_argument(std::string(what) + ": every list has one entry per tensor");
}

}  // namespace

void bind_optim(py::module_& m) {
  using namespace optim;
  m.doc() = "Fused CPU optimizer kernels (SGD, Adam/AdamW, weight prediction) on raw buffers.";

  m.def(
      "sgd_step",
      [](uintptr_t param, int param_dtype, uintptr_t grad, int grad_dtype, uintptr_t momentum_buf,
         int64_t numel, double lr, double momentum, double dampening, bool nesterov,
         double weight_decay, bool maximize, bool first_step, uintptr_t master,
         uintptr_t found_inf, uintptr_t predict_out, double predict_s) {
        SgdArgs a;
        a.param = ptr<void>(param);
        a.param_dtype = param_dtype;
        a.grad = ptr<const void>(grad);
        a.grad_dtype = grad_dtype;
        a.momentum_buf = ptr<void>(momentum_buf);
        a.master = ptr<void>(master);
        a.predict_out = ptr<void>(predict_out);
        a.n = numel;
        a.lr = lr;
        a.momentum = momentum;
        a.dampening = dampening;
        a.weight_decay = weight_decay;
        a.predict_s = predict_s;
        a.nesterov = nesterov;
        a.maximize = maximize;
        a.first_step = first_step;
        py::gil_scoped_release release;
        sgd_step(a, ptr<const float>(found_inf));
      },
      py::arg("param"), py::arg("param_dtype"), py::arg("grad"), py::arg("grad_dtype"),
      py::arg("momentum_buf"), py::arg("numel"), py::arg("lr"), py::arg("momentum"),
      py::arg("dampening"), py::arg("nesterov"), py::arg("weight_decay"), py::arg("maximize"),
      py::arg("first_step"), py::arg("master"), py::arg("found_inf"), py::arg("predict_out"),
      py::arg("predict_s"),
      "One fused SGD(-momentum) step (+ optional SpecTrain prediction) over raw buffers.");

  m.def(
      "adam_step",
      [](uintptr_t param, int param_dtype, uintptr_t grad, int grad_dtype, uintptr_t exp_avg,
         uintptr_t exp_avg_sq, int64_t numel, double lr, double beta1, double beta2, double eps,
         double weight_decay, bool decoupled, bool maximize, int64_t step, uintptr_t master,
         uintptr_t found_inf, uintptr_t predict_out, double predict_s) {
        AdamArgs a;
        a.param = ptr<void>(param);
        a.param_dtype = param_dtype;
        a.grad = ptr<const void>(grad);
        a.grad_dtype = grad_dtype;
        a.exp_avg = ptr<void>(exp_avg);
        a.exp_avg_sq = ptr<void>(exp_avg_sq);
        a.master = ptr<void>(master);
        a.predict_out = ptr<void>(predict_out);
        a.n = numel;
        a.lr = lr;
        a.beta1 = beta1;
        a.beta2 = beta2;
        a.eps = eps;
        a.weight_decay = weight_decay;
        a.predict_s = predict_s;
        a.decoupled = decoupled;
        a.maximize = maximize;
        a.step = step;
        py::gil_scoped_release release;
        adam_step(a, ptr<const float>(found_inf));
      },
      py::arg("param"), py::arg("param_dtype"), py::arg("grad"), py::arg("grad_dtype"),
      py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("numel"), py::arg("lr"),
      py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
      py::arg("decoupled"), py::arg("maximize"), py::arg("step"), py::arg("master"),
      py::arg("found_inf"), py::arg("predict_out"), py::arg("predict_s"),
      "One fused Adam/AdamW step (+ optional XPipe prediction) over raw buffers.");

  m.def(
      "sgd_predict",
      [](uintptr_t param, int param_dtype, uintptr_t momentum_buf, uintptr_t out, int out_dtype,
         int64_t numel, double s, double lr) {
        PredictArgs a;
        a.param = ptr<const void>(param);
        a.param_dtype = param_dtype;
        a.exp_avg = ptr<const void>(momentum_buf);
        a.out = ptr<void>(out);
        a.out_dtype = out_dtype;
        a.n = numel;
        a.s = s;
        a.lr = lr;
        py::gil_scoped_release release;
        sgd_predict(a);
      },
      py::arg("param"), py::arg("param_dtype"), py::arg("momentum_buf"), py::arg("out"),
      py::arg("out_dtype"), py::arg("numel"), py::arg("s"), py::arg("lr"),
      "out = w - s*lr*buf (SpecTrain); buf 0 (absent) gives out = w.");

  m.def(
      "adam_predict",
      [](uintptr_t param, int param_dtype, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t out,
         int out_dtype, int64_t numel, double s, double lr, double beta1, double beta2,
         double eps, int64_t step) {
        PredictArgs a;
        a.param = ptr<const void>(param);
        a.param_dtype = param_dtype;
        a.exp_avg = ptr<const void>(exp_avg);
        a.exp_avg_sq = ptr<const void>(exp_avg_sq);
        a.out = ptr<void>(out);
        a.out_dtype = out_dtype;
        a.n = numel;
        a.s = s;
        a.lr = lr;
        a.beta1 = beta1;
        a.beta2 = beta2;
        a.eps = eps;
        a.step = step;
        py::gil_scoped_release release;
        adam_predict(a);
      },
      py::arg("param"), py::arg("param_dtype"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
      py::arg("out"), py::arg("out_dtype"), py::arg("numel"), py::arg("s"), py::arg("lr"),
      py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("step"),
      "out = w - s*lr*mhat/(sqrt(vhat)+eps) (XPipe), bias-corrected at step; step 0: out = w.");

  m.def(
      "sgd_step_multi",
      [](const Addrs& params, int param_dtype, const Addrs& grads, int grad_dtype,
         const Addrs& momentum_bufs, const std::vector<int64_t>& numels,
         const std::vector<bool>& first_steps, double lr, double momentum, double dampening,
         bool nesterov, double weight_decay, bool maximize, const Addrs& masters,
         uintptr_t found_inf, const Addrs& predict_outs, double predict_s) {
        const size_t n = params.size();
        check_lengths(n, {&grads, &momentum_bufs, &masters, &predict_outs}, "sgd_step_multi");
        if (grads.size() != n || numels.size() != n || first_steps.size() != n)
          throw std::invalid_argument("sgd_step_multi: every list has one entry per tensor");
        std::vector<SgdArgs> args(n);
        for (size_t t = 0; t < n; ++t) {
          SgdArgs& a = args[t];
          a.param = ptr<void>(params[t]);
          a.param_dtype = param_dtype;
          a.grad = ptr<const void>(grads[t]);
          a.grad_dtype = grad_dtype;
          a.momentum_buf = ptr<void>(at(momentum_bufs, t));
          a.master = ptr<void>(at(masters, t));
          a.predict_out = ptr<void>(at(predict_outs, t));
          a.n = numels[t];
          a.lr = lr;
          a.momentum = momentum;
          a.dampening = dampening;
          a.weight_decay = weight_decay;
          a.predict_s = predict_s;
          a.nesterov = nesterov;
          a.maximize = maximize;
          a.first_step = first_steps[t];
        }
        py::gil_scoped_release release;
        sgd_step_multi(args.data(), int64_t(n), ptr<const float>(found_inf));
      },
      py::arg("params"), py::arg("param_dtype"), py::arg("grads"), py::arg("grad_dtype"),
      py::arg("momentum_bufs"), py::arg("numels"), py::arg("first_steps"), py::arg("lr"),
      py::arg("momentum"), py::arg("dampening"), py::arg("nesterov"), py::arg("weight_decay"),
      py::arg("maximize"), py::arg("masters"), py::arg("found_inf"), py::arg("predict_outs"),
      py::arg("predict_s"), "sgd_step over a list of tensors in one parallel pass.");

  m.def(
      "adam_step_multi",
      [](const Addrs& params, int param_dtype, const Addrs& grads, int grad_dtype,
         const Addrs& exp_avgs, const Addrs& exp_avg_sqs, const std::vector<int64_t>& numels,
         const std::vector<int64_t>& steps, double lr, double beta1, double beta2, double eps,
         double weight_decay, bool decoupled, bool maximize, const Addrs& masters,
         uintptr_t found_inf, const Addrs& predict_outs, double predict_s,
         const Addrs& step_counters, bool counters_f64) {
        const size_t n = params.size();
        check_lengths(n, {&masters, &predict_outs, &step_counters}, "adam_step_multi");
        const bool counted = !step_counters.empty();
        if (grads.size() != n || exp_avgs.size() != n || exp_avg_sqs.size() != n ||
            numels.size() != n || (!counted && steps.size() != n))
          throw std::invalid_argument("adam_step_multi: every list has one entry per tensor");
        std::vector<AdamArgs> args(n);
        for (size_t t = 0; t < n; ++t) {
          AdamArgs& a = args[t];
          a.param = ptr<void>(params[t]);
          a.param_dtype = param_dtype;
          a.grad = ptr<const void>(grads[t]);
          a.grad_dtype = grad_dtype;
          a.exp_avg = ptr<void>(exp_avgs[t]);
          a.exp_avg_sq = ptr<void>(exp_avg_sqs[t]);
          a.master = ptr<void>(at(masters, t));
          a.predict_out = ptr<void>(at(predict_outs, t));
          a.n = numels[t];
          a.lr = lr;
          a.beta1 = beta1;
          a.beta2 = beta2;
          a.eps = eps;
          a.weight_decay = weight_decay;
          a.predict_s = predict_s;
          a.decoupled = decoupled;
          a.maximize = maximize;
          a.step = counted ? read_counter(step_counters[t], counters_f64) + 1 : steps[t];
        }
        py::gil_scoped_release release;
        adam_step_multi(args.data(), int64_t(n), ptr<const float>(found_inf));
        // The counters move only if the step ran (a set found_inf flag skips everything).
        if (counted && !(found_inf && *ptr<const float>(found_inf) != 0.0f))
          for (size_t t = 0; t < n; ++t) write_counter(step_counters[t], counters_f64, args[t].step);
      },
      py::arg("params"), py::arg("param_dtype"), py::arg("grads"), py::arg("grad_dtype"),
      py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("numels"), py::arg("steps"),
      py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("decoupled"), py::arg("maximize"), py::arg("masters"),
      py::arg("found_inf"), py::arg("predict_outs"), py::arg("predict_s"),
      py::arg("step_counters"), py::arg("counters_f64"),
      "adam_step over a list of tensors (each its own step count) in one parallel pass. With "
      "step_counters (addresses of 0-d fp32, or fp64, step tensors) each tensor's step is its "
      "counter + 1, written back after the pass; else `steps` gives them.");

  m.def(
      "sgd_predict_multi",
      [](const Addrs& params, int param_dtype, const Addrs& momentum_bufs, const Addrs& outs,
         int out_dtype, const std::vector<int64_t>& numels, double s, double lr) {
        const size_t n = params.size();
        check_lengths(n, {&momentum_bufs}, "sgd_predict_multi");
        if (outs.size() != n || numels.size() != n)
          throw std::invalid_argument("sgd_predict_multi: every list has one entry per tensor");
        std::vector<PredictArgs> args(n);
        for (size_t t = 0; t < n; ++t) {
          PredictArgs& a = args[t];
          a.param = ptr<const void>(params[t]);
          a.param_dtype = param_dtype;
          a.exp_avg = ptr<const void>(at(momentum_bufs, t));
          a.out = ptr<void>(outs[t]);
          a.out_dtype = out_dtype;
          a.n = numels[t];
          a.s = s;
          a.lr = lr;
        }
        py::gil_scoped_release release;
        sgd_predict_multi(args.data(), int64_t(n));
      },
      py::arg("params"), py::arg("param_dtype"), py::arg("momentum_bufs"), py::arg("outs"),
      py::arg("out_dtype"), py::arg("numels"), py::arg("s"), py::arg("lr"),
      "sgd_predict over a list of tensors in one parallel pass.");

  m.def(
      "adam_predict_multi",
      [](const Addrs& params, int param_dtype, const Addrs& exp_avgs, const Addrs& exp_avg_sqs,
         const Addrs& outs, int out_dtype, const std::vector<int64_t>& numels, double s,
         double lr, double beta1, double beta2, double eps, const std::vector<int64_t>& steps,
         const Addrs& step_counters, bool counters_f64) {
        const size_t n = params.size();
        check_lengths(n, {&step_counters}, "adam_predict_multi");
        const bool counted = !step_counters.empty();
        if (exp_avgs.size() != n || exp_avg_sqs.size() != n || outs.size() != n ||
            numels.size() != n || (!counted && steps.size() != n))
          throw std::invalid_argument("adam_predict_multi: every list has one entry per tensor");
        std::vector<PredictArgs> args(n);
        for (size_t t = 0; t < n; ++t) {
          PredictArgs& a = args[t];
          a.param = ptr<const void>(params[t]);
          a.param_dtype = param_dtype;
          a.exp_avg = ptr<const void>(exp_avgs[t]);
          a.exp_avg_sq = ptr<const void>(exp_avg_sqs[t]);
          a.out = ptr<void>(outs[t]);
          a.out_dtype = out_dtype;
          a.n = numels[t];
          a.s = s;
          a.lr = lr;
          a.beta1 = beta1;
          a.beta2 = beta2;
          a.eps = eps;
          a.step = counted ? read_counter(step_counters[t], counters_f64) : steps[t];
        }
        py::gil_scoped_release release;
        adam_predict_multi(args.data(), int64_t(n));
      },
      py::arg("params"), py::arg("param_dtype"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
      py::arg("outs"), py::arg("out_dtype"), py::arg("numels"), py::arg("s"), py::arg("lr"),
      py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("steps"),
      py::arg("step_counters"), py::arg("counters_f64"),
      "adam_predict over a list of tensors (each its own step count) in one parallel pass.");

  m.def("set_num_threads", [](int n) { ThreadPool::instance().set_num_threads(n); },
        py::arg("n"), "Threads per kernel call, the caller included (default: all cores).");
  m.def("get_num_threads", [] { return ThreadPool::instance().num_threads(); });
  m.def("simd_level", &simd_level, "The code path in use: 'avx512', 'avx2' or 'scalar'.");
}

}  // namespace pipetrain

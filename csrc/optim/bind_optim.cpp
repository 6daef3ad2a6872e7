// Binds the fused CPU optimizer kernels into pipetrain._C.optim.
//
// Torch-free: tensors arrive as raw addresses (tensor.data_ptr(), 0 meaning "absent") plus
// dtype codes (0 float32, 1 bfloat16, 2 float16); engine/_cpu_kernels.py validates the
// tensors (device, contiguity, numel, dtype) before calling. The GIL is released for the
// whole kernel, so pipeline stages on other threads keep running.
#include <pybind11/pybind11.h>

#include <cstdint>

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
        a.momentum_buf = ptr<float>(momentum_buf);
        a.master = ptr<float>(master);
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
        a.exp_avg = ptr<float>(exp_avg);
        a.exp_avg_sq = ptr<float>(exp_avg_sq);
        a.master = ptr<float>(master);
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
        a.exp_avg = ptr<const float>(momentum_buf);
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
        a.exp_avg = ptr<const float>(exp_avg);
        a.exp_avg_sq = ptr<const float>(exp_avg_sq);
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

  m.def("set_num_threads", [](int n) { ThreadPool::instance().set_num_threads(n); },
        py::arg("n"), "Threads per kernel call, the caller included (default: all cores).");
  m.def("get_num_threads", [] { return ThreadPool::instance().num_threads(); });
  m.def("simd_level", &simd_level, "The code path in use: 'avx512', 'avx2' or 'scalar'.");
}

}  // namespace pipetrain

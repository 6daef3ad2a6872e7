// One pybind11 module, pipetrain._C, assembled from one binder per component.
// Each component owns its binder file; this header only declares them.
#pragma once
#include <pybind11/pybind11.h>

namespace pipetrain {
void bind_schedule(pybind11::module_& m);  // csrc/schedule/bind_schedule.cpp -> _C.schedule
void bind_runtime(pybind11::module_& m);   // csrc/runtime/bind_runtime.cpp   -> _C.runtime
void bind_optim(pybind11::module_& m);     // csrc/optim/bind_optim.cpp       -> _C.optim
void bind_graphs(pybind11::module_& m);    // csrc/runtime/bind_graphs.cpp    -> _C.runtime
}  // namespace pipetrain

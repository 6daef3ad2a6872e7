// pipetrain._C: the torch-free C++ core. Submodules: schedule, runtime, optim.
#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "pipetrain C++ core (schedule IR, executor, fused CPU kernels); no torch headers";
  auto schedule = m.def_submodule("schedule", "schedule IR, generators, validator, simulator");
  auto runtime = m.def_submodule("runtime", "executor: streams, events, transfers, timeline");
  auto optim = m.def_submodule("optim", "fused CPU optimizer updates and weight prediction");
  pipetrain::bind_schedule(schedule);
  pipetrain::bind_runtime(runtime);
  pipetrain::bind_optim(optim);
}

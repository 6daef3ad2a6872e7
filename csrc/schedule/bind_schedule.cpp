// Binds the schedule component into pipetrain._C.schedule (placeholder until the component lands).
#include "bindings.h"

namespace pipetrain {
void bind_schedule(pybind11::module_& m) { (void)m; }
}  // namespace pipetrain

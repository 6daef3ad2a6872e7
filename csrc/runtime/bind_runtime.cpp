// Binds the runtime component into pipetrain._C.runtime (placeholder until the component lands).
#include "bindings.h"

namespace pipetrain {
void bind_runtime(pybind11::module_& m) { (void)m; }
}  // namespace pipetrain

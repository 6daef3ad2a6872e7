// Binds the optim component into pipetrain._C.optim (placeholder until the component lands).
#include "bindings.h"

namespace pipetrain {
void bind_optim(pybind11::module_& m) { (void)m; }
}  // namespace pipetrain

// Binds StageGraph (and its Edge / StageInfo views) into pipetrain._C.schedule.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace pipetrain {

void bind_stage_graph(pybind11::module_& m);

// A Python int as int32, or ValueError naming `field` ("stage", "num_microbatches", ...).
std::int32_t int32_arg(pybind11::handle value, const std::string& field);

}  // namespace pipetrain

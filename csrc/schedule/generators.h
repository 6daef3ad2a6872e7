// Generators for the synchronous schedules; each documents its order as a p = 4 grid.
#pragma once
#include <string>
#include <vector>

#include "schedule/schedule.h"

namespace pipetrain::schedule {

// Names build() accepts, in display order.
const std::vector<std::string>& schedule_names();

// Builds the named schedule. num_chunks is used by "interleaved-1f1b" only (and must be 1
// otherwise). Throws std::invalid_argument naming what is allowed.
Schedule build(const std::string& name, int num_stages, int num_microbatches, int num_chunks);

// The families (gen_fill_drain.cpp, gen_interleaved.cpp, gen_zero_bubble.cpp).
Schedule gpipe(int p, int m);
Schedule one_f_one_b(int p, int m);
Schedule interleaved_1f1b(int p, int m, int v);
Schedule zero_bubble(int p, int m, bool h2);

}  // namespace pipetrain::schedule

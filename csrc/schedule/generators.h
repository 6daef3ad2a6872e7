// Generators for the synchronous schedules; each documents its order as a p = 4 grid.
#pragma once
#include <string>
#include <vector>

#include "schedule/schedule.h"

namespace pipetrain::schedule {

// Names build() accepts, in display order.
const std::vector<std::string>& schedule_names();

// Builds the named schedule. num_chunks is used by "interleaved-1f1b" only (and must be 1
// otherwise). Over num_minibatches = T > 1 the plan is, per device, the T one-mini-batch
// orders one after another, mini-batch t's micro-batches numbered t*m .. t*m+m-1 (no flush
// beyond what the dependencies imply). With `updates`, every pass of mini-batch t runs on
// weight version t and each stage gets U(s, t) right after its last B (or W) of mini-batch
// t on its device; without, versions stay -1 and there are no U's. Throws
// std::invalid_argument naming what is allowed.
Schedule build(const std::string& name, int num_stages, int num_microbatches, int num_chunks,
               int num_minibatches = 1, bool updates = false);

// The T-mini-batch plan of a one-mini-batch schedule, as build() describes.
Schedule over_minibatches(const Schedule& one, int num_minibatches, bool updates);

// The families (gen_fill_drain.cpp, gen_interleaved.cpp, gen_zero_bubble.cpp).
Schedule gpipe(int p, int m);
Schedule one_f_one_b(int p, int m);
Schedule interleaved_1f1b(int p, int m, int v);
Schedule zero_bubble(int p, int m, bool h2, bool batch_w = false);

}  // namespace pipetrain::schedule

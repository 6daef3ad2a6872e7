// The text form of a schedule: a header line and a device x time grid.
//
//   # schedule 1f1b stages=4 devices=4 microbatches=8
//   d0: 0F0 0F1 0F2 0F3  .   .   .  0B0 0F4 ...
//   d1:  .  1F0 1F1 1F2  .   .  1B0 1F3 1B1 ...
//
// Columns are time slots of a unit-cost play-out (simulator.h's play_out with every action,
// transfers and updates included, one slot long), so bubbles show as ".". A schedule that
// does not validate is printed in plain issue order. The header adds "minibatches=T" when
// T > 1, "placement=" when stages do not sit one per device in id order and "edges=" when
// the stage graph is not the chain 0 -> 1 -> ....
//
// parse_text reads the same form back: rows "d<k>: <action> ..." ("." cells are idle and
// ignored), an optional header "# schedule <name> key=value ..." (stages, devices,
// microbatches, minibatches, placement=0,1,..., edges=0>1,1>2), other "#" lines are
// comments. What the text leaves out is inferred as custom.h says.
#pragma once
#include <string>
#include <string_view>

#include "schedule/schedule.h"

namespace pipetrain::schedule {

std::string to_text(const Schedule& s);

// Throws std::invalid_argument ("line <n>: ...") on malformed text or sizes the actions
// cannot fill (custom.h). Not validated: that is validate()'s job.
Schedule parse_text(std::string_view text);

}  // namespace pipetrain::schedule

// The printed form of a schedule: a header line and a device x time grid.
//
//   # schedule 1f1b stages=4 devices=4 microbatches=8
//   d0: 0F0 0F1 0F2 0F3  .   .   .  0B0 0F4 ...
//   d1:  .  1F0 1F1 1F2  .   .  1B0 1F3 1B1 ...
//
// Columns are time slots of a unit-cost play-out (every action, transfers included, takes
// one slot and starts as soon as its dependencies allow), so bubbles show as ".". A
// schedule that does not validate is printed in plain issue order. The header adds
// "placement=" when stages do not sit one per device in id order and "edges=" when the
// stage graph is not the chain 0 -> 1 -> ...; the parser (Python, schedules.parse) reads
// the same form back, ignoring "." cells.
#pragma once
#include <string>

#include "schedule/schedule.h"

namespace pipetrain::schedule {

std::string to_text(const Schedule& s);

}  // namespace pipetrain::schedule

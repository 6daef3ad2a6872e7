// Lowering: insert the send/receive actions a schedule needs between devices.
//
// For every compute action and every stage edge that crosses devices:
//   F(s, mb):   RF(s, mb < pred) just before it, SF(s, mb > succ) just after it;
//   B/I(s, mb): RB(s, mb < succ) just before it, SB(s, mb > pred) just after it.
// Edges between stages on the same device need no transfer. The lowered schedule
// validates under the same rules (a receive after its send, F / B / I after their
// receives), which also proves every send matched by exactly one receive and, sends being
// asynchronous, the order deadlock-free.
#pragma once
#include "schedule/schedule.h"

namespace pipetrain::schedule {

// Throws std::invalid_argument if s already contains transfers.
Schedule lower(const Schedule& s);

}  // namespace pipetrain::schedule

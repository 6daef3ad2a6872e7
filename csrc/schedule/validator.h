// The validator: a schedule is complete, respects every dependency, and cannot deadlock.
//
// Semantics it proves against (the executor's): each device issues its actions in list
// order, one at a time; an action starts once every dependency (dependencies.h) has
// finished. Sends are asynchronous (they never wait for the receiver); a receive waits for
// its send. Then "cannot deadlock" is exactly "the union of program order and dependency
// edges is acyclic", which a topological walk of the per-device queues decides in linear
// time.
#pragma once
#include <vector>

#include "schedule/dependencies.h"

namespace pipetrain::schedule {

struct Validated {
  DepGraph deps;
  std::vector<int> order;  // gids in an order that executes the schedule (topological)
};

// Returns the first violation (ok() if none). Checks, in this order: each action on its own
// and completeness (resolve), then same-device dependencies that point forward in program
// order (named by the rule of that dependency), then cross-device cycles ("deadlock").
Violation validate(const Schedule& s, Validated* out);

}  // namespace pipetrain::schedule

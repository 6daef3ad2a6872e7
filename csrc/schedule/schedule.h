// A schedule (a plan): a stage graph, micro-batch and mini-batch counts, and each device's
// actions in issue order.
//
// A plan spans T = num_minibatches mini-batches of m = num_microbatches micro-batches each;
// micro-batches are numbered globally, k = t * m + j (0 <= k < T * m). Synchronous plans
// have T = 1 unless built over several mini-batches; asynchronous ones need no flush between
// mini-batches. Updates U(s, t) and weight versions are described in action.h.
#pragma once
#include <string>
#include <vector>

#include "schedule/action.h"
#include "schedule/stage_graph.h"

namespace pipetrain::schedule {

struct Schedule {
  std::string name;  // generator name ("1f1b", ...) or "custom"
  StageGraph graph;
  int num_microbatches = 0;  // m, per mini-batch
  int num_minibatches = 1;   // T
  std::vector<std::vector<Action>> per_device;  // size graph.num_devices()

  int num_devices() const { return graph.num_devices(); }
  int num_stages() const { return graph.num_stages(); }
  // T * m: the number of micro-batches the plan covers.
  int total_microbatches() const { return num_microbatches * num_minibatches; }
  // Total number of actions over all devices.
  int num_actions() const;
  // True if any action is a transfer (the schedule was lowered, lower.h).
  bool lowered() const;
  // True if the backward is split into I and W (zero-bubble style).
  bool split_backward() const;
  // True if the plan contains optimizer updates (U).
  bool has_updates() const;
  // True if the passes name weight versions.
  bool versioned() const;

 private:
  bool any(bool (*pred)(const Action&)) const;
};

}  // namespace pipetrain::schedule

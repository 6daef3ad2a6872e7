// A schedule: a stage graph, a micro-batch count, and each device's actions in issue order.
#pragma once
#include <string>
#include <vector>

#include "schedule/action.h"
#include "schedule/stage_graph.h"

namespace pipetrain::schedule {

struct Schedule {
  std::string name;  // generator name ("1f1b", ...) or "custom"
  StageGraph graph;
  int num_microbatches = 0;
  std::vector<std::vector<Action>> per_device;  // size graph.num_devices()

  int num_devices() const { return graph.num_devices(); }
  int num_stages() const { return graph.num_stages(); }
  // Total number of actions over all devices.
  int num_actions() const;
  // True if any action is a transfer (the schedule was lowered, lower.h).
  bool lowered() const;
  // True if the backward is split into I and W (zero-bubble style).
  bool split_backward() const;
};

}  // namespace pipetrain::schedule

// Hand-written schedules (from lists of actions or from text): defaults and size limits.
//
// Whatever is not given is inferred from the actions, the way schedules.from_actions
// documents it. Sizes must follow from the actions given, never from a number alone: a
// schedule with more stages than passes (F/B/I/W) listed, or a device that holds no stage
// and lists no action, is rejected here, before anything is allocated for them; a claimed
// micro-batch count beyond what the actions fill costs nothing until the validator reports
// the missing work (slot_table.h). Numbers must fit int32 (the IR's width).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "schedule/schedule.h"

namespace pipetrain::schedule {

struct CustomSpec {
  std::string name = "custom";
  // (device, that device's actions in issue order); devices not listed have none.
  std::vector<std::pair<std::int64_t, std::vector<Action>>> rows;
  // Defaults: stages = len(placement), else one more than the largest stage (or peer)
  // named; devices = one more than the largest device listed; mini-batches = one more than
  // the largest U index (1 without U's); micro-batches per mini-batch = the largest
  // micro-batch named + 1, divided by the mini-batches (rounded up); edges = the chain
  // 0 -> 1 -> ...; placement = the device whose list names the stage first (a stage named
  // nowhere goes to device stage % devices).
  std::optional<std::int64_t> num_stages, num_devices, num_microbatches, num_minibatches;
  std::optional<std::vector<std::pair<int, int>>> edges;
  std::optional<std::vector<int>> placement;
  // A given stage graph replaces stages, devices, edges and placement (which must then be
  // absent or agree).
  const StageGraph* graph = nullptr;
};

// Throws std::invalid_argument naming the field and the limit.
Schedule make_custom(CustomSpec spec);

}  // namespace pipetrain::schedule

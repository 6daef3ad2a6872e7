// Whole-schedule queries that need no dependency analysis.
#include "schedule/schedule.h"

namespace pipetrain::schedule {

int Schedule::num_actions() const {
  int n = 0;
  for (const auto& row : per_device) n += static_cast<int>(row.size());
  return n;
}

bool Schedule::any(bool (*pred)(const Action&)) const {
  for (const auto& row : per_device)
    for (const auto& a : row)
      if (pred(a)) return true;
  return false;
}

bool Schedule::lowered() const {
  return any([](const Action& a) { return is_transfer(a.kind); });
}

bool Schedule::split_backward() const {
  return any([](const Action& a) { return a.kind == Kind::I || a.kind == Kind::W; });
}

bool Schedule::has_updates() const {
  return any([](const Action& a) { return is_update(a.kind); });
}

bool Schedule::versioned() const {
  return any([](const Action& a) { return is_pass(a.kind) && a.version != kLiveWeights; });
}

}  // namespace pipetrain::schedule

// Whole-schedule queries that need no dependency analysis.
#include "schedule/schedule.h"

namespace pipetrain::schedule {

int Schedule::num_actions() const {
  int n = 0;
  for (const auto& row : per_device) n += static_cast<int>(row.size());
  return n;
}

bool Schedule::lowered() const {
  for (const auto& row : per_device)
    for (const auto& a : row)
      if (is_transfer(a.kind)) return true;
  return false;
}

bool Schedule::split_backward() const {
  for (const auto& row : per_device)
    for (const auto& a : row)
      if (a.kind == Kind::I || a.kind == Kind::W) return true;
  return false;
}

}  // namespace pipetrain::schedule

// Printing and naming of schedule actions (see action.h for the text form).
#include "schedule/action.h"

namespace pipetrain::schedule {

namespace {
constexpr const char* kNames[kNumKinds] = {"F", "B", "I", "W", "SF", "RF", "SB", "RB"};
}

const char* kind_name(Kind k) { return kNames[static_cast<int>(k)]; }

bool kind_from_name(const std::string& name, Kind* out) {
  for (int i = 0; i < kNumKinds; ++i) {
    if (name == kNames[i]) {
      *out = static_cast<Kind>(i);
      return true;
    }
  }
  return false;
}

std::string to_string(const Action& a) {
  std::string s = std::to_string(a.stage);
  s += kind_name(a.kind);
  s += std::to_string(a.microbatch);
  if (is_transfer(a.kind)) {
    s += is_send(a.kind) ? '>' : '<';
    s += std::to_string(a.peer);
  }
  return s;
}

}  // namespace pipetrain::schedule

// The rules a schedule must satisfy, and the violation record naming the first one broken.
#pragma once
#include <cstdint>
#include <string>

namespace pipetrain::schedule {

enum class Rule : std::uint8_t {
  kOk = 0,
  // Structure: each action on its own.
  kStageRange,       // stage id outside 0..S-1
  kMicrobatchRange,  // micro-batch outside 0..T*m-1
  kUpdateRange,      // U's mini-batch index outside 0..T-1
  kVersionRange,     // version < -1, or (with U's) above the number of U's of that stage
  kVersionMismatch,  // versioned and unversioned passes mixed (or unversioned ones beside
                     // U's); also, under completeness, F, B / I, W of one (stage,
                     // micro-batch) on different versions
  kWrongDevice,      // action listed on a device that does not hold its stage
  kNotAnEdge,        // transfer between stages that share no edge (in that direction)
  kLocalTransfer,    // transfer between two stages on the same device
  kDuplicate,        // the same action appears twice
  // Completeness: every (stage, micro-batch) has its work exactly once.
  kMissingForward,
  kMissingBackward,  // no B and no I
  kMissingWeight,    // I without its W
  kMixedBackward,    // B together with I or W for the same (stage, micro-batch)
  kMissingUpdate,    // a schedule with U's lacks U(stage, t) for some stage and t < T
  kMissingTransfer,  // lowered schedule: a cross-device edge has neither send nor recv
  kUnmatchedSend,    // a send with no receive
  kUnmatchedRecv,    // a receive with no send
  // Dependencies: each names the edge an action waits on.
  kForwardAfterPredecessor,  // F(s) after F(pred) -- unlowered
  kForwardAfterRecv,         // F(s) after its activation receive -- lowered
  kBackwardAfterForward,     // B/I(s) after F(s)
  kBackwardAfterSuccessor,   // B/I(s) after B/I(succ) -- unlowered
  kBackwardAfterRecv,        // B/I(s) after its gradient receive -- lowered
  kWeightAfterInputGrad,     // W(s) after I(s)
  kSendAfterCompute,         // a send after the F or B/I producing what it sends
  kRecvAfterSend,            // a receive after its matching send
  kUpdateAfterGradient,      // U(s, t) after every B / W of s in mini-batch t
  kUpdateOrder,              // U(s, t) after U(s, t-1)
  kVersionAfterUpdate,       // a pass of s on version v >= 1 after U(s, v-1)
  // Whole schedule.
  kDeadlock,  // a cycle across devices: no order of execution finishes
};

// Kebab-case name, e.g. "backward-after-forward" (what ScheduleError.rule holds).
const char* rule_name(Rule r);

struct Violation {
  Rule rule = Rule::kOk;
  int device = -1;       // device of the offending action
  int index = -1;        // its position on that device, -1 when the action is missing
  std::string action;    // the offending action, printed ("1B3")
  std::string message;   // full sentence for people
  bool ok() const { return rule == Rule::kOk; }
};

}  // namespace pipetrain::schedule

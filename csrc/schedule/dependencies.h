// The one dependency-resolution routine: for each action, the actions it waits for.
//
// Actions get a global id gid = offset[device] + index. resolve() indexes every action by
// (kind, stage, micro-batch[, edge]) in slot tables (slot_table.h: flat arrays, linear
// time), checks each action on its own and the schedule's completeness, then lists for
// each action the gids it must wait for beyond program order on its own device. Rules
// (stage edges, not s +- 1; m micro-batches per mini-batch):
//
//   F(s, mb)    after F(pred, mb) for every predecessor          (lowered, cross-device:
//                                                                 after RF(s, mb < pred))
//   B/I(s, mb)  after F(s, mb), and after B/I(succ, mb) for every successor (lowered,
//                                                                 cross-device: after RB)
//   W(s, mb)    after I(s, mb)
//   U(s, t)     after the B (or W) of s for micro-batches t*m .. t*m+m-1, and after
//               U(s, t-1)
//   any pass of s on version v >= 1 (in a plan with U's): after U(s, v-1)
//   SF / SB     after the F / B-or-I that produced what they send
//   RF / RB     after their matching send
//
// Updates and versions: a plan either names no versions (every pass on the live weights, no
// U) or puts every pass on a version; F, B / I and W of one (stage, micro-batch) share it;
// with U's, every stage has exactly one U per mini-batch and a version v needs v U's.
//
// The validator (order check + deadlock walk), the simulator and Schedule.dependencies()
// for the executor all read this one structure.
#pragma once
#include <vector>

#include "schedule/rules.h"
#include "schedule/schedule.h"

namespace pipetrain::schedule {

struct DepGraph {
  std::vector<int> offset;     // size D + 1: device d's actions are gids offset[d]..offset[d+1)
  std::vector<int> device;     // gid -> device
  std::vector<int> dep_start;  // size N + 1: deps of gid are dep[dep_start[g]..dep_start[g+1])
  std::vector<int> dep;        // gids waited for
  std::vector<Rule> dep_rule;  // the rule each dependency comes from (for error messages)
  bool lowered = false;

  int num_actions() const { return static_cast<int>(device.size()); }
  int index_of(int gid) const { return gid - offset[device[gid]]; }
};

// Fills *out and returns the first structural or completeness violation (ok() if none).
// Dependency order and deadlock are the validator's business (validator.h).
Violation resolve(const Schedule& s, DepGraph* out);

// The action a gid names (for messages).
const Action& action_at(const Schedule& s, const DepGraph& g, int gid);

}  // namespace pipetrain::schedule

// Discrete-event simulation of a validated schedule: makespan, busy/idle, bubble, memory.
//
// Costs are per stage. F costs forward[s]; B costs backward[s] (the full backward); for a
// split backward, W costs weight[s] and I costs backward[s] - weight[s], so the same
// arguments describe 1F1B and zero-bubble schedules; U costs update[s]. A batched W of n
// micro-batches ("1W3-5", action.h) costs a + b * n with a = weight_fixed[s] (what one W
// computation costs whatever its size: launches, the graph restart, one accumulation into
// the gradient) and b = weight[s] - a, so n = 1 is the plain W; weight_fixed = 0 (the
// default) makes it n plain W's, weight_fixed = weight one W whatever n. Transfers take no
// device time: a dependency on an action of another device becomes available
// transfer_latency + transfer_bytes / bandwidth after that action ends (in a lowered
// schedule this is the send -> receive edge; unlowered, the compute -> compute edge).
//
// Each action starts at max(end of the previous action on its device, availability of each
// dependency) -- the executor's semantics (validator.h), evaluated in topological order by
// play_out(), which the printed grid (text.h) also uses with every action one slot long.
//
// "In flight" (activation memory, in (stage, micro-batch) units): an (s, mb) is in flight on
// s's device from the start of F(s, mb) to the end of the backward pass that frees its
// activations -- B, or I for a split backward (W needs only the stage input and the output
// gradient, which the paper's Table 1 counts as far smaller). It depends only on each
// device's order, not on costs.
#pragma once
#include <vector>

#include "schedule/validator.h"

namespace pipetrain::schedule {

struct Costs {
  std::vector<double> forward, backward, weight;  // size num_stages each
  bool weight_given = false;  // false: a split backward costs backward / 2 for each of I, W
  std::vector<double> update;  // size num_stages; empty: updates cost nothing
  // Size num_stages, each 0 <= a <= W's cost; empty: 0 (a batched W of n costs n W's).
  std::vector<double> weight_fixed;
  double transfer = 0.0;       // seconds per cross-device dependency (latency + bytes / bw)
};

// Duration of each (kind, stage): at[kind * num_stages + stage] (kinds in enum order).
struct Durations {
  int num_stages = 0;
  std::vector<double> at;
  Durations(int stages, double fill)
      : num_stages(stages), at(static_cast<size_t>(kNumKinds) * stages, fill) {}
  double& of(Kind k, int stage) { return at[static_cast<size_t>(k) * num_stages + stage]; }
  double of(Kind k, int stage) const { return at[static_cast<size_t>(k) * num_stages + stage]; }
  // Batched W: the fixed part a of a + b * n per stage (empty: 0).
  std::vector<double> weight_fixed;
  // Duration of action a: of(kind, stage), or a + (W - a) * n for a W covering n micro-batches.
  double of(const Action& a) const {
    const double d = of(a.kind, a.stage);
    if (a.count == 1) return d;
    const double fixed = weight_fixed.empty() ? 0.0 : weight_fixed[a.stage];
    return fixed + (d - fixed) * a.count;
  }
};

// Start and end of every action (per device, per action), and when each device goes idle.
struct PlayOut {
  std::vector<std::vector<double>> start, end;
  std::vector<double> busy;     // per device, sum of durations
  double makespan = 0.0;
};

// The one simulation loop: each action starts once its device is free and every dependency
// has ended (plus `transfer` when on another device), and lasts dur.of(kind, stage).
PlayOut play_out(const Schedule& s, const Validated& v, const Durations& dur, double transfer);

struct SimResult {
  double makespan = 0.0;
  std::vector<double> busy, idle;      // per device; idle = makespan - busy
  double bubble_ratio = 0.0;           // sum idle / (devices * makespan)
  std::vector<int> peak_inflight;      // per device
  std::vector<std::vector<double>> start, end;  // per device, per action
};

// Throws std::invalid_argument if the costs do not fit the schedule (sizes, negatives).
SimResult simulate(const Schedule& s, const Validated& v, const Costs& c);

// Peak in-flight count per device from the order alone (see above).
std::vector<int> peak_inflight(const Schedule& s);

}  // namespace pipetrain::schedule

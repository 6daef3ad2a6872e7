// The discrete-event simulator: one pass over a topological order of the schedule.
#include "schedule/simulator.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace pipetrain::schedule {

std::vector<int> peak_inflight(const Schedule& s) {
  std::vector<int> peak(s.num_devices(), 0);
  const bool split = s.split_backward();
  for (int d = 0; d < s.num_devices(); ++d) {
    int cur = 0;
    for (const Action& a : s.per_device[d]) {
      if (a.kind == Kind::F) peak[d] = std::max(peak[d], ++cur);
      else if (a.kind == Kind::B || (split && a.kind == Kind::I)) --cur;
    }
  }
  return peak;
}

PlayOut play_out(const Schedule& s, const Validated& v, const Durations& dur, double transfer) {
  const int D = s.num_devices();
  const DepGraph& g = v.deps;
  PlayOut r;
  r.busy.assign(D, 0.0);
  r.start.resize(D);
  r.end.resize(D);
  for (int d = 0; d < D; ++d) {
    r.start[d].assign(s.per_device[d].size(), 0.0);
    r.end[d].assign(s.per_device[d].size(), 0.0);
  }
  std::vector<double> end(g.num_actions(), 0.0), free_at(D, 0.0);
  for (int gid : v.order) {
    const int d = g.device[gid];
    const int i = gid - g.offset[d];
    const Action& a = s.per_device[d][i];
    double t = free_at[d];
    for (int j = g.dep_start[gid]; j < g.dep_start[gid + 1]; ++j) {
      const int x = g.dep[j];
      t = std::max(t, end[x] + (g.device[x] != d ? transfer : 0.0));
    }
    const double du = dur.of(a);
    end[gid] = free_at[d] = t + du;
    r.busy[d] += du;
    r.start[d][i] = t;
    r.end[d][i] = t + du;
  }
  for (int d = 0; d < D; ++d) r.makespan = std::max(r.makespan, free_at[d]);
  return r;
}

SimResult simulate(const Schedule& s, const Validated& v, const Costs& c) {
  const int S = s.num_stages(), D = s.num_devices();
  auto check = [&](const std::vector<double>& x, const char* name) {
    if (static_cast<int>(x.size()) != S)
      throw std::invalid_argument(std::string(name) + " costs need one value per stage (" +
                                  std::to_string(S) + "), got " + std::to_string(x.size()));
    for (double y : x)
      if (!(y >= 0.0)) throw std::invalid_argument(std::string(name) + " costs must be >= 0");
  };
  check(c.forward, "forward");
  check(c.backward, "backward");
  if (c.weight_given) {
    check(c.weight, "weight");
    for (int st = 0; st < S; ++st)
      if (c.weight[st] > c.backward[st])
        throw std::invalid_argument("weight cost of stage " + std::to_string(st) +
                                    " exceeds its backward cost (backward is the full B = I + W)");
  }
  if (!c.update.empty()) check(c.update, "update");
  if (!c.weight_fixed.empty()) check(c.weight_fixed, "weight_fixed");
  if (!(c.transfer >= 0.0)) throw std::invalid_argument("transfer cost must be >= 0");

  Durations dur(S, 0.0);  // transfers take no device time
  for (int st = 0; st < S; ++st) {
    const double w = c.weight_given ? c.weight[st] : 0.5 * c.backward[st];
    dur.of(Kind::F, st) = c.forward[st];
    dur.of(Kind::B, st) = c.backward[st];
    dur.of(Kind::I, st) = c.backward[st] - w;
    dur.of(Kind::W, st) = w;
    dur.of(Kind::U, st) = c.update.empty() ? 0.0 : c.update[st];
    if (!c.weight_fixed.empty() && c.weight_fixed[st] > w)
      throw std::invalid_argument("weight_fixed of stage " + std::to_string(st) + " (" +
                                  std::to_string(c.weight_fixed[st]) +
                                  ") exceeds the cost of its W (" + std::to_string(w) +
                                  "): a batched W of n costs weight_fixed + (W - weight_fixed) n");
  }
  dur.weight_fixed = c.weight_fixed;
  PlayOut p = play_out(s, v, dur, c.transfer);
  SimResult r;
  r.makespan = p.makespan;
  r.busy = std::move(p.busy);
  r.start = std::move(p.start);
  r.end = std::move(p.end);
  r.idle.assign(D, 0.0);
  double idle = 0.0;
  for (int d = 0; d < D; ++d) {
    r.idle[d] = r.makespan - r.busy[d];
    idle += r.idle[d];
  }
  r.bubble_ratio = r.makespan > 0.0 ? idle / (D * r.makespan) : 0.0;
  r.peak_inflight = peak_inflight(s);
  return r;
}

}  // namespace pipetrain::schedule

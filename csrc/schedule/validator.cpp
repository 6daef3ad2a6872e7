// Dependency-order check and the deadlock walk over per-device queues.
#include "schedule/validator.h"

#include <string>

namespace pipetrain::schedule {

namespace {

std::string where(const DepGraph& g, const Schedule& s, int gid) {
  return to_string(action_at(s, g, gid)) + " (device " + std::to_string(g.device[gid]) +
         ", position " + std::to_string(g.index_of(gid)) + ")";
}

}  // namespace

Violation validate(const Schedule& s, Validated* out) {
  Violation v = resolve(s, &out->deps);
  if (!v.ok()) return v;
  const DepGraph& g = out->deps;
  const int D = s.num_devices(), N = g.num_actions();

  // A dependency on a later action of the same device can never be met: name its rule.
  for (int gid = 0; gid < N; ++gid) {
    for (int j = g.dep_start[gid]; j < g.dep_start[gid + 1]; ++j) {
      const int x = g.dep[j];
      if (g.device[x] == g.device[gid] && x > gid) {
        v.rule = g.dep_rule[j];
        v.device = g.device[gid];
        v.index = g.index_of(gid);
        v.action = to_string(action_at(s, g, gid));
        v.message = "action " + where(g, s, gid) + " breaks rule " + rule_name(v.rule) +
                    ": it waits for " + where(g, s, x) + ", which comes later on its own device";
        return v;
      }
    }
  }

  // Topological walk: advance each device while its head's dependencies are done; a device
  // blocked on action x is parked on x's waiter list and woken when x completes. Each
  // dependency is inspected once (cursor), so the walk is linear in actions + dependencies.
  std::vector<int> ptr(D, 0), cursor(g.dep_start.begin(), g.dep_start.end() - 1);
  std::vector<char> done(N, 0);
  std::vector<int> first_waiter(N, -1), next_waiter(D, -1), blocked_on(D, -1);
  std::vector<int> ready;
  ready.reserve(D);
  for (int d = D - 1; d >= 0; --d) ready.push_back(d);
  auto& order = out->order;
  order.clear();
  order.reserve(N);
  while (!ready.empty()) {
    const int d = ready.back();
    ready.pop_back();
    blocked_on[d] = -1;
    while (g.offset[d] + ptr[d] < g.offset[d + 1]) {
      const int gid = g.offset[d] + ptr[d];
      int& c = cursor[gid];
      while (c < g.dep_start[gid + 1] && done[g.dep[c]]) ++c;
      if (c < g.dep_start[gid + 1]) {
        const int x = g.dep[c];
        blocked_on[d] = x;
        next_waiter[d] = first_waiter[x];
        first_waiter[x] = d;
        break;
      }
      done[gid] = 1;
      order.push_back(gid);
      ++ptr[d];
      for (int w = first_waiter[gid]; w >= 0;) {
        const int nx = next_waiter[w];
        ready.push_back(w);
        w = nx;
      }
      first_waiter[gid] = -1;
    }
  }
  if (static_cast<int>(order.size()) == N) return Violation();

  // Deadlock: report the first blocked device's head, and the chain of waits it sits in.
  int d0 = -1;
  for (int d = 0; d < D; ++d)
    if (blocked_on[d] >= 0) {
      d0 = d;
      break;
    }
  const int head = g.offset[d0] + ptr[d0];
  std::string chain;
  std::vector<char> seen(D, 0);
  for (int d = d0, hops = 0; d >= 0 && !seen[d] && hops < 8; ++hops) {
    seen[d] = 1;
    const int h = g.offset[d] + ptr[d];
    const int x = blocked_on[d];
    if (x < 0) break;
    chain += "; " + where(g, s, h) + " waits for " + where(g, s, x);
    const int dx = g.device[x];
    d = blocked_on[dx] >= 0 ? dx : -1;
  }
  v.rule = Rule::kDeadlock;
  v.device = d0;
  v.index = ptr[d0];
  v.action = to_string(action_at(s, g, head));
  v.message = "action " + where(g, s, head) +
              " breaks rule deadlock: no execution order finishes the schedule" + chain;
  return v;
}

}  // namespace pipetrain::schedule

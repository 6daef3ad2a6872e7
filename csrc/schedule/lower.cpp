// Insertion of send/receive actions around cross-device compute actions.
#include "schedule/lower.h"

#include <stdexcept>

namespace pipetrain::schedule {

Schedule lower(const Schedule& s) {
  if (s.lowered()) throw std::invalid_argument("schedule is already lowered (it has transfers)");
  Schedule out;
  out.name = s.name;
  out.graph = s.graph;
  out.num_microbatches = s.num_microbatches;
  out.num_minibatches = s.num_minibatches;
  out.per_device.resize(s.num_devices());
  const StageGraph& G = s.graph;
  for (int d = 0; d < s.num_devices(); ++d) {
    auto& row = out.per_device[d];
    row.reserve(s.per_device[d].size() * 2);
    for (const Action& a : s.per_device[d]) {
      auto transfer = [&](Kind k, int peer) {
        Action x;  // transfers carry no weight version
        x.stage = a.stage;
        x.microbatch = a.microbatch;
        x.kind = k;
        x.peer = peer;
        row.push_back(x);
      };
      const bool fwd = a.kind == Kind::F, bwd = is_input_grad(a.kind);
      const bool in_range = a.stage >= 0 && a.stage < G.num_stages();
      if (in_range && fwd) {
        for (int j = G.pred_begin(a.stage); j < G.pred_end(a.stage); ++j)
          if (G.device_of(G.pred_at(j)) != d) transfer(Kind::RF, G.pred_at(j));
      } else if (in_range && bwd) {
        for (int e = G.succ_begin(a.stage); e < G.succ_end(a.stage); ++e)
          if (G.device_of(G.succ_at(e)) != d) transfer(Kind::RB, G.succ_at(e));
      }
      row.push_back(a);
      if (in_range && fwd) {
        for (int e = G.succ_begin(a.stage); e < G.succ_end(a.stage); ++e)
          if (G.device_of(G.succ_at(e)) != d) transfer(Kind::SF, G.succ_at(e));
      } else if (in_range && bwd) {
        for (int j = G.pred_begin(a.stage); j < G.pred_end(a.stage); ++j)
          if (G.device_of(G.pred_at(j)) != d) transfer(Kind::SB, G.pred_at(j));
      }
    }
  }
  return out;
}

}  // namespace pipetrain::schedule

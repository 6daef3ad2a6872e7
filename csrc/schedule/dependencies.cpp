// Indexing actions by (kind, stage, micro-batch) and resolving their dependencies.
#include "schedule/dependencies.h"

#include <string>

namespace pipetrain::schedule {

namespace {

// Flat lookup tables: one slot per (stage, micro-batch) for compute kinds and per
// (edge, micro-batch) for transfer kinds; -1 = absent.
struct Tables {
  int m = 0;
  std::vector<int> compute[4];   // F, B, I, W by stage * m + mb
  std::vector<int> transfer[4];  // SF, RF, SB, RB by edge * m + mb
};

Violation make(Rule r, int device, int index, const Action& a, const std::string& why) {
  Violation v;
  v.rule = r;
  v.device = device;
  v.index = index;
  v.action = to_string(a);
  v.message = "action " + v.action +
              (index >= 0 ? " (device " + std::to_string(device) + ", position " +
                                std::to_string(index) + ")"
                          : " (device " + std::to_string(device) + ")") +
              " breaks rule " + rule_name(r) + ": " + why;
  return v;
}

// Edge id a transfer travels on, or -1. Forward data flows stage -> successor.
int transfer_edge(const StageGraph& g, const Action& a) {
  switch (a.kind) {
    case Kind::SF: return g.edge_id(a.stage, a.peer);  // s -> peer
    case Kind::RF: return g.edge_id(a.peer, a.stage);  // peer -> s
    case Kind::SB: return g.edge_id(a.peer, a.stage);  // gradient of edge peer -> s
    case Kind::RB: return g.edge_id(a.stage, a.peer);  // gradient of edge s -> peer
    default: return -1;
  }
}

}  // namespace

const Action& action_at(const Schedule& s, const DepGraph& g, int gid) {
  int d = g.device[gid];
  return s.per_device[d][gid - g.offset[d]];
}

Violation resolve(const Schedule& s, DepGraph* out) {
  const StageGraph& G = s.graph;
  const int S = G.num_stages(), D = G.num_devices(), m = s.num_microbatches, E = G.num_edges();
  DepGraph& g = *out;
  g = DepGraph();
  g.lowered = s.lowered();
  g.offset.assign(D + 1, 0);
  for (int d = 0; d < D; ++d)
    g.offset[d + 1] = g.offset[d] + static_cast<int>(s.per_device[d].size());
  const int N = g.offset[D];
  g.device.resize(N);

  Tables t;
  t.m = m;
  for (auto& v : t.compute) v.assign(static_cast<size_t>(S) * m, -1);
  if (g.lowered)
    for (auto& v : t.transfer) v.assign(static_cast<size_t>(E) * m, -1);

  // Pass 1: each action on its own; fill the tables; catch duplicates.
  for (int d = 0; d < D; ++d) {
    const auto& row = s.per_device[d];
    for (int i = 0; i < static_cast<int>(row.size()); ++i) {
      const Action& a = row[i];
      const int gid = g.offset[d] + i;
      g.device[gid] = d;
      if (a.stage < 0 || a.stage >= S)
        return make(Rule::kStageRange, d, i, a, "stages are 0.." + std::to_string(S - 1));
      if (a.microbatch < 0 || a.microbatch >= m)
        return make(Rule::kMicrobatchRange, d, i, a,
                    "micro-batches are 0.." + std::to_string(m - 1));
      if (G.device_of(a.stage) != d)
        return make(Rule::kWrongDevice, d, i, a,
                    "stage " + std::to_string(a.stage) + " lives on device " +
                        std::to_string(G.device_of(a.stage)));
      int* slot;
      if (is_compute(a.kind)) {
        slot = &t.compute[static_cast<int>(a.kind)][static_cast<size_t>(a.stage) * m + a.microbatch];
      } else {
        int e = transfer_edge(G, a);
        if (e < 0)
          return make(Rule::kNotAnEdge, d, i, a,
                      "stages " + std::to_string(a.stage) + " and " + std::to_string(a.peer) +
                          " share no edge in that direction");
        if (G.device_of(a.peer) == d)
          return make(Rule::kLocalTransfer, d, i, a,
                      "stages on the same device pass data without a transfer");
        slot = &t.transfer[static_cast<int>(a.kind) - 4][static_cast<size_t>(e) * m + a.microbatch];
      }
      if (*slot >= 0) {
        int first = *slot;
        return make(Rule::kDuplicate, d, i, a,
                    "it already appears at position " + std::to_string(first - g.offset[d]));
      }
      *slot = gid;
    }
  }

  // Pass 2: completeness, in (stage, micro-batch) order.
  const auto& F = t.compute[0];
  const auto& Bf = t.compute[1];
  const auto& In = t.compute[2];
  const auto& Wt = t.compute[3];
  for (int st = 0; st < S; ++st) {
    const int d = G.device_of(st);
    for (int mb = 0; mb < m; ++mb) {
      const size_t k = static_cast<size_t>(st) * m + mb;
      if (F[k] < 0)
        return make(Rule::kMissingForward, d, -1, compute_action(st, mb, Kind::F),
                    "every (stage, micro-batch) needs exactly one forward");
      if (Bf[k] >= 0 && (In[k] >= 0 || Wt[k] >= 0)) {
        int other = In[k] >= 0 ? In[k] : Wt[k];
        return make(Rule::kMixedBackward, d, other - g.offset[d], action_at(s, g, other),
                    "the backward is either one B or an I and a W, not both");
      }
      if (Bf[k] < 0 && In[k] < 0)
        return make(Rule::kMissingBackward, d, -1,
                    compute_action(st, mb, Wt[k] >= 0 ? Kind::I : Kind::B),
                    Wt[k] >= 0 ? "a W needs its I (input-gradient backward)"
                               : "every (stage, micro-batch) needs exactly one backward");
      if (In[k] >= 0 && Wt[k] < 0)
        return make(Rule::kMissingWeight, d, -1, compute_action(st, mb, Kind::W),
                    "an I (input-gradient backward) needs its W (weight-gradient backward)");
    }
  }
  if (g.lowered) {
    for (int e = 0; e < E; ++e) {
      const auto [from, to] = G.edge_list()[e];
      if (G.device_of(from) == G.device_of(to)) continue;
      for (int mb = 0; mb < m; ++mb) {
        const size_t k = static_cast<size_t>(e) * m + mb;
        // Forward direction (from -> to), then the gradient (to -> from).
        const int sends[2] = {t.transfer[0][k], t.transfer[2][k]};
        const int recvs[2] = {t.transfer[1][k], t.transfer[3][k]};
        for (int dir = 0; dir < 2; ++dir) {
          Action a;
          a.microbatch = mb;
          a.stage = dir == 0 ? from : to;
          a.peer = dir == 0 ? to : from;
          a.kind = dir == 0 ? Kind::SF : Kind::SB;
          if (sends[dir] >= 0 && recvs[dir] < 0) {
            int gs = sends[dir];
            return make(Rule::kUnmatchedSend, g.device[gs], gs - g.offset[g.device[gs]],
                        action_at(s, g, gs), "no stage receives what it sends");
          }
          if (sends[dir] < 0 && recvs[dir] >= 0) {
            int gr = recvs[dir];
            return make(Rule::kUnmatchedRecv, g.device[gr], gr - g.offset[g.device[gr]],
                        action_at(s, g, gr), "no stage sends what it waits for");
          }
          if (sends[dir] < 0)
            return make(Rule::kMissingTransfer, G.device_of(a.stage), -1, a,
                        "a lowered schedule sends every cross-device activation and gradient");
        }
      }
    }
  }

  // Pass 3: dependency lists.
  g.dep_start.assign(N + 1, 0);
  g.dep.reserve(static_cast<size_t>(N) * 2);
  g.dep_rule.reserve(static_cast<size_t>(N) * 2);
  auto add = [&](int gid, Rule r) {
    g.dep.push_back(gid);
    g.dep_rule.push_back(r);
  };
  for (int d = 0; d < D; ++d) {
    const auto& row = s.per_device[d];
    for (int i = 0; i < static_cast<int>(row.size()); ++i) {
      const Action& a = row[i];
      const int gid = g.offset[d] + i;
      const int st = a.stage, mb = a.microbatch;
      const size_t k = static_cast<size_t>(st) * m + mb;
      switch (a.kind) {
        case Kind::F:
          for (int j = G.pred_begin(st); j < G.pred_end(st); ++j) {
            const int p = G.pred_at(j), e = G.pred_edge_at(j);
            if (g.lowered && G.device_of(p) != d)
              add(t.transfer[1][static_cast<size_t>(e) * m + mb], Rule::kForwardAfterRecv);
            else
              add(F[static_cast<size_t>(p) * m + mb], Rule::kForwardAfterPredecessor);
          }
          break;
        case Kind::B:
        case Kind::I:
          add(F[k], Rule::kBackwardAfterForward);
          for (int e = G.succ_begin(st); e < G.succ_end(st); ++e) {
            const int q = G.succ_at(e);
            if (g.lowered && G.device_of(q) != d) {
              add(t.transfer[3][static_cast<size_t>(e) * m + mb], Rule::kBackwardAfterRecv);
            } else {
              const size_t kq = static_cast<size_t>(q) * m + mb;
              add(Bf[kq] >= 0 ? Bf[kq] : In[kq], Rule::kBackwardAfterSuccessor);
            }
          }
          break;
        case Kind::W: add(In[k], Rule::kWeightAfterInputGrad); break;
        case Kind::SF: add(F[k], Rule::kSendAfterCompute); break;
        case Kind::SB: add(Bf[k] >= 0 ? Bf[k] : In[k], Rule::kSendAfterCompute); break;
        case Kind::RF: {
          const int e = G.edge_id(a.peer, st);
          add(t.transfer[0][static_cast<size_t>(e) * m + mb], Rule::kRecvAfterSend);
          break;
        }
        case Kind::RB: {
          const int e = G.edge_id(st, a.peer);
          add(t.transfer[2][static_cast<size_t>(e) * m + mb], Rule::kRecvAfterSend);
          break;
        }
      }
      g.dep_start[gid + 1] = static_cast<int>(g.dep.size());
    }
  }
  return Violation();
}

}  // namespace pipetrain::schedule

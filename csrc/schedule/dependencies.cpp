// Indexing actions by (kind, stage, micro-batch) and resolving their dependencies.
#include "schedule/dependencies.h"

#include <string>

#include "schedule/slot_table.h"

namespace pipetrain::schedule {

namespace {

constexpr int kF = pass_slot(Kind::F), kB = pass_slot(Kind::B), kI = pass_slot(Kind::I),
              kW = pass_slot(Kind::W);
constexpr int kSF = transfer_slot(Kind::SF), kRF = transfer_slot(Kind::RF),
              kSB = transfer_slot(Kind::SB), kRB = transfer_slot(Kind::RB);

// Where each action sits: passes by (stage, micro-batch), transfers by (edge, micro-batch),
// updates by (stage, mini-batch).
struct Tables {
  std::int64_t n = 0;  // micro-batches in the plan, T * m
  int T = 1;
  SlotTable pass, transfer, update;
  std::int64_t pk(int st, int mb) const { return static_cast<std::int64_t>(st) * n + mb; }
  std::int64_t ek(int e, int mb) const { return static_cast<std::int64_t>(e) * n + mb; }
  std::int64_t uk(int st, int t) const { return static_cast<std::int64_t>(st) * T + t; }
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

std::string range(int hi) { return "0.." + std::to_string(hi - 1); }

}  // namespace

const Action& action_at(const Schedule& s, const DepGraph& g, int gid) {
  int d = g.device[gid];
  return s.per_device[d][gid - g.offset[d]];
}

Violation resolve(const Schedule& s, DepGraph* out) {
  const StageGraph& G = s.graph;
  const int S = G.num_stages(), D = G.num_devices(), E = G.num_edges();
  const int m = s.num_microbatches, T = s.num_minibatches;
  const int n = s.total_microbatches();
  DepGraph& g = *out;
  g = DepGraph();
  g.offset.assign(D + 1, 0);
  for (int d = 0; d < D; ++d)
    g.offset[d + 1] = g.offset[d] + static_cast<int>(s.per_device[d].size());
  const int N = g.offset[D];
  g.device.resize(N);

  // Pass 0: counts that size the tables and the version rules.
  std::int64_t passes = 0, transfers = 0, updates = 0;
  std::vector<int> updates_of(S, 0);  // U's per stage (in-range ones)
  int first_pass_version = kLiveWeights - 1;  // none seen yet
  for (const auto& row : s.per_device) {
    for (const Action& a : row) {
      if (is_pass(a.kind)) {
        ++passes;
        if (first_pass_version < kLiveWeights) first_pass_version = a.version;
      } else if (is_update(a.kind)) {
        ++updates;
        if (a.stage >= 0 && a.stage < S) ++updates_of[a.stage];
      } else {
        ++transfers;
      }
    }
  }
  g.lowered = transfers > 0;
  const bool with_updates = updates > 0;
  // Every pass is versioned when the plan has updates; otherwise like the first pass.
  const bool versioned = with_updates || first_pass_version > kLiveWeights;

  Tables t;
  t.n = n;
  t.T = T;
  t.pass.init(kNumPassKinds, static_cast<std::int64_t>(S) * n, passes);
  if (g.lowered) t.transfer.init(kNumTransferKinds, static_cast<std::int64_t>(E) * n, transfers);
  if (with_updates) t.update.init(1, static_cast<std::int64_t>(S) * T, updates);

  // Pass 1: each action on its own; fill the tables; catch duplicates.
  for (int d = 0; d < D; ++d) {
    const auto& row = s.per_device[d];
    for (int i = 0; i < static_cast<int>(row.size()); ++i) {
      const Action& a = row[i];
      const int gid = g.offset[d] + i;
      g.device[gid] = d;
      if (a.stage < 0 || a.stage >= S)
        return make(Rule::kStageRange, d, i, a, "stages are " + range(S));
      if (is_update(a.kind)) {
        if (a.microbatch < 0 || a.microbatch >= T)
          return make(Rule::kUpdateRange, d, i, a, "mini-batches are " + range(T));
      } else if (a.microbatch < 0 || a.last_microbatch() >= n) {
        return make(Rule::kMicrobatchRange, d, i, a, "micro-batches are " + range(n));
      }
      if (a.count < 1 || (a.count != 1 && a.kind != Kind::W))
        return make(Rule::kMicrobatchRange, d, i, a,
                    "only a W covers several micro-batches (a batched W, '1W3-5')");
      if (!takes_version(a.kind) && a.version != kLiveWeights)
        return make(Rule::kVersionRange, d, i, a, "only F, B, I and W name a weight version");
      if (takes_version(a.kind)) {
        if (a.version < kLiveWeights)
          return make(Rule::kVersionRange, d, i, a, "versions are >= 0 (or -1: live weights)");
        if ((a.version != kLiveWeights) != versioned)
          return make(Rule::kVersionMismatch, d, i, a,
                      with_updates ? "a plan with updates (U) puts every pass on a version"
                                   : "versioned and unversioned passes are mixed");
        if (with_updates && a.version > updates_of[a.stage])
          return make(Rule::kVersionRange, d, i, a,
                      "version " + std::to_string(a.version) + " needs " +
                          std::to_string(a.version) + " update(s) of stage " +
                          std::to_string(a.stage) + ", the plan has " +
                          std::to_string(updates_of[a.stage]));
      }
      if (G.device_of(a.stage) != d)
        return make(Rule::kWrongDevice, d, i, a,
                    "stage " + std::to_string(a.stage) + " lives on device " +
                        std::to_string(G.device_of(a.stage)));
      int* slot;
      if (a.count > 1) {
        // A batched W takes the W slot of every micro-batch it covers: a micro-batch whose
        // W appears in two actions (batched or not) is a duplicate, named by both.
        for (int mb = a.microbatch; mb <= a.last_microbatch(); ++mb) {
          int& w = t.pass.at(kW, t.pk(a.stage, mb));
          if (w >= 0)
            return make(Rule::kDuplicate, d, i, a,
                        "the W of micro-batch " + std::to_string(mb) + " already appears in " +
                            to_string(action_at(s, g, w)) + " at position " +
                            std::to_string(g.index_of(w)) + " of device " +
                            std::to_string(g.device[w]));
          w = gid;
        }
        continue;
      }
      if (is_pass(a.kind)) {
        slot = &t.pass.at(pass_slot(a.kind), t.pk(a.stage, a.microbatch));
      } else if (is_update(a.kind)) {
        slot = &t.update.at(0, t.uk(a.stage, a.microbatch));
      } else {
        int e = transfer_edge(G, a);
        if (e < 0)
          return make(Rule::kNotAnEdge, d, i, a,
                      "stages " + std::to_string(a.stage) + " and " + std::to_string(a.peer) +
                          " share no edge in that direction");
        if (G.device_of(a.peer) == d)
          return make(Rule::kLocalTransfer, d, i, a,
                      "stages on the same device pass data without a transfer");
        slot = &t.transfer.at(transfer_slot(a.kind), t.ek(e, a.microbatch));
      }
      if (*slot >= 0) {
        int first = *slot;
        const Action& other = action_at(s, g, first);
        return make(Rule::kDuplicate, d, i, a,
                    other.count > 1 ? "its micro-batch is already covered by " +
                                          to_string(other) + " at position " +
                                          std::to_string(g.index_of(first))
                                    : "it already appears at position " +
                                          std::to_string(first - g.offset[d]));
      }
      *slot = gid;
    }
  }

  // Pass 2: completeness, in (stage, micro-batch) order. When the tables are hash maps
  // (slot_table.h) some action is necessarily missing, so these loops stop early.
  const SlotTable& P = t.pass;
  auto version_of = [&](int gid) { return action_at(s, g, gid).version; };
  for (int st = 0; st < S; ++st) {
    const int d = G.device_of(st);
    for (int mb = 0; mb < n; ++mb) {
      const std::int64_t k = t.pk(st, mb);
      const int f = P.get(kF, k), b = P.get(kB, k), in = P.get(kI, k), w = P.get(kW, k);
      if (f < 0)
        return make(Rule::kMissingForward, d, -1, pass_action(st, mb, Kind::F),
                    "every (stage, micro-batch) needs exactly one forward");
      if (b >= 0 && (in >= 0 || w >= 0)) {
        int other = in >= 0 ? in : w;
        return make(Rule::kMixedBackward, d, other - g.offset[d], action_at(s, g, other),
                    "the backward is either one B or an I and a W, not both");
      }
      if (b < 0 && in < 0)
        return make(Rule::kMissingBackward, d, -1,
                    pass_action(st, mb, w >= 0 ? Kind::I : Kind::B),
                    w >= 0 ? "a W needs its I (input-gradient backward)"
                           : "every (stage, micro-batch) needs exactly one backward");
      if (in >= 0 && w < 0)
        return make(Rule::kMissingWeight, d, -1, pass_action(st, mb, Kind::W),
                    "an I (input-gradient backward) needs its W (weight-gradient backward)");
      for (int x : {b, in, w}) {
        if (x >= 0 && version_of(x) != version_of(f))
          return make(Rule::kVersionMismatch, d, x - g.offset[d], action_at(s, g, x),
                      "its forward " + to_string(action_at(s, g, f)) +
                          " ran on another weight version");
      }
    }
  }
  if (with_updates) {
    for (int st = 0; st < S; ++st)
      for (int mt = 0; mt < T; ++mt)
        if (t.update.get(0, t.uk(st, mt)) < 0)
          return make(Rule::kMissingUpdate, G.device_of(st), -1, update_action(st, mt),
                      "a plan with updates has one U per stage and mini-batch");
  }
  if (g.lowered) {
    for (int e = 0; e < E; ++e) {
      const auto [from, to] = G.edge_list()[e];
      if (G.device_of(from) == G.device_of(to)) continue;
      for (int mb = 0; mb < n; ++mb) {
        const std::int64_t k = t.ek(e, mb);
        // Forward direction (from -> to), then the gradient (to -> from).
        const int sends[2] = {t.transfer.get(kSF, k), t.transfer.get(kSB, k)};
        const int recvs[2] = {t.transfer.get(kRF, k), t.transfer.get(kRB, k)};
        for (int dir = 0; dir < 2; ++dir) {
          Action a;
          a.microbatch = mb;
          a.stage = dir == 0 ? from : to;
          a.peer = dir == 0 ? to : from;
          a.kind = dir == 0 ? Kind::SF : Kind::SB;
          if (sends[dir] >= 0 && recvs[dir] < 0) {
            int gs = sends[dir];
            return make(Rule::kUnmatchedSend, g.device[gs], g.index_of(gs),
                        action_at(s, g, gs), "no stage receives what it sends");
          }
          if (sends[dir] < 0 && recvs[dir] >= 0) {
            int gr = recvs[dir];
            return make(Rule::kUnmatchedRecv, g.device[gr], g.index_of(gr),
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
  // The backward that produces the input gradient (B or I) / finishes the weight gradient
  // (B or W) of a (stage, micro-batch).
  auto input_grad = [&](std::int64_t k) {
    const int b = P.get(kB, k);
    return b >= 0 ? b : P.get(kI, k);
  };
  auto weight_grad = [&](std::int64_t k) {
    const int b = P.get(kB, k);
    return b >= 0 ? b : P.get(kW, k);
  };
  for (int d = 0; d < D; ++d) {
    const auto& row = s.per_device[d];
    for (int i = 0; i < static_cast<int>(row.size()); ++i) {
      const Action& a = row[i];
      const int gid = g.offset[d] + i;
      const int st = a.stage, mb = a.microbatch;
      const std::int64_t k = t.pk(st, mb);
      if (with_updates && takes_version(a.kind) && a.version >= 1)
        add(t.update.get(0, t.uk(st, a.version - 1)), Rule::kVersionAfterUpdate);
      switch (a.kind) {
        case Kind::F:
          for (int j = G.pred_begin(st); j < G.pred_end(st); ++j) {
            const int p = G.pred_at(j), e = G.pred_edge_at(j);
            if (g.lowered && G.device_of(p) != d)
              add(t.transfer.get(kRF, t.ek(e, mb)), Rule::kForwardAfterRecv);
            else
              add(P.get(kF, t.pk(p, mb)), Rule::kForwardAfterPredecessor);
          }
          break;
        case Kind::B:
        case Kind::I:
          add(P.get(kF, k), Rule::kBackwardAfterForward);
          for (int e = G.succ_begin(st); e < G.succ_end(st); ++e) {
            const int q = G.succ_at(e);
            if (g.lowered && G.device_of(q) != d)
              add(t.transfer.get(kRB, t.ek(e, mb)), Rule::kBackwardAfterRecv);
            else
              add(input_grad(t.pk(q, mb)), Rule::kBackwardAfterSuccessor);
          }
          break;
        case Kind::W:
          // A batched W waits for the I of every micro-batch it covers.
          for (int j = mb; j <= a.last_microbatch(); ++j)
            add(P.get(kI, t.pk(st, j)), Rule::kWeightAfterInputGrad);
          break;
        case Kind::U: {
          int last = -1;  // a batched W covering several micro-batches is waited for once
          for (int j = mb * m; j < (mb + 1) * m; ++j) {
            const int x = weight_grad(t.pk(st, j));
            if (x != last) add(x, Rule::kUpdateAfterGradient);
            last = x;
          }
          if (mb > 0) add(t.update.get(0, t.uk(st, mb - 1)), Rule::kUpdateOrder);
          break;
        }
        case Kind::SF: add(P.get(kF, k), Rule::kSendAfterCompute); break;
        case Kind::SB: add(input_grad(k), Rule::kSendAfterCompute); break;
        case Kind::RF:
          add(t.transfer.get(kSF, t.ek(G.edge_id(a.peer, st), mb)), Rule::kRecvAfterSend);
          break;
        case Kind::RB:
          add(t.transfer.get(kSB, t.ek(G.edge_id(st, a.peer), mb)), Rule::kRecvAfterSend);
          break;
      }
      g.dep_start[gid + 1] = static_cast<int>(g.dep.size());
    }
  }
  return Violation();
}

}  // namespace pipetrain::schedule

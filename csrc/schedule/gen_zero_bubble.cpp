// Zero-bubble handcrafted schedules ZB-H1 and ZB-H2 (Qi et al., arXiv 2401.10241, sec. 2).
#include "schedule/generators.h"

#include <algorithm>
#include <string>

namespace pipetrain::schedule {

// The backward is split into I (input gradient, on the critical path) and W (weight
// gradient, needed only before the optimizer step), so W can wait and fill bubbles.
// Stage s of p runs `warmup` forwards, then for each micro-batch j in order: I(j), every
// W that is now `lag` micro-batches old (W(j - lag)), then the next forward; then the
// remaining W's.
//
//   ZB-H1: warmup = p - s, lag = s. Before each F, stage s holds p - s activations awaiting
//          their I -- the same peak as 1F1B -- and s pending W's (the paper's
//          (p-s) M_B + s M_W, sec. 2.1). B starts earlier than in 1F1B and the deferred W's
//          fill the tail: bubble (p-1)(F+I-W), a third of 1F1B's (p-1)(F+I+W) when
//          F = I = W (needs m >= p).
//   ZB-H2: warmup = 2(p - s) - 1, lag = 2s. The extra warm-up forwards fill the bubble
//          before the first I: every device is busy from its first action to its last (a
//          parallelogram, which tiles across iterations when the optimizer step needs no
//          global sync), at up to 2p - 1 activations in flight on stage 0 (sec. 2.2).
//          With m < 2p - 1 micro-batches the drain has fewer idle slots than 2s to fill,
//          so the lag shrinks to max(0, m - (p - s)); deferring more would leave the
//          device idle with W's still waiting (p = 3, m = 3: 12 slots instead of 11).
//          With that, ZB-H2 is never slower than ZB-H1 (tested over p <= 16, m <= 64).
//
// ZB-H1, p = 4, m = 8 (unit-cost time slots):
//
//   d0: 0F0 0F1 0F2 0F3  .   .   .  0I0 0W0 0F4 0I1 0W1 0F5 0I2 0W2 0F6 0I3 0W3 0F7 0I4 0W4 0I5 0W5 0I6 0W6 0I7 0W7
//   d1:  .  1F0 1F1 1F2  .   .  1I0 1F3 1I1 1W0 1F4 1I2 1W1 1F5 1I3 1W2 1F6 1I4 1W3 1F7 1I5 1W4 1I6 1W5 1I7 1W6 1W7
//   d2:  .   .  2F0 2F1  .  2I0 2F2 2I1 2F3 2I2 2W0 2F4 2I3 2W1 2F5 2I4 2W2 2F6 2I5 2W3 2F7 2I6 2W4 2I7 2W5 2W6 2W7
//   d3:  .   .   .  3F0 3I0 3F1 3I1 3F2 3I2 3F3 3I3 3W0 3F4 3I4 3W1 3F5 3I5 3W2 3F6 3I6 3W3 3F7 3I7 3W4 3W5 3W6 3W7
//
// ZB-H2, p = 4, m = 8 (unit-cost time slots):
//
//   d0: 0F0 0F1 0F2 0F3 0F4 0F5 0F6 0I0 0W0 0F7 0I1 0W1 0I2 0W2 0I3 0W3 0I4 0W4 0I5 0W5 0I6 0W6 0I7 0W7
//   d1:  .  1F0 1F1 1F2 1F3 1F4 1I0 1F5 1I1 1F6 1I2 1W0 1F7 1I3 1W1 1I4 1W2 1I5 1W3 1I6 1W4 1I7 1W5 1W6 1W7
//   d2:  .   .  2F0 2F1 2F2 2I0 2F3 2I1 2F4 2I2 2F5 2I3 2F6 2I4 2W0 2F7 2I5 2W1 2I6 2W2 2I7 2W3 2W4 2W5 2W6 2W7
//   d3:  .   .   .  3F0 3I0 3F1 3I1 3F2 3I2 3F3 3I3 3F4 3I4 3F5 3I5 3F6 3I6 3W0 3F7 3I7 3W1 3W2 3W3 3W4 3W5 3W6 3W7
//
// Batched W ("zb-h1-bw", "zb-h2-bw"): the same order, except that the W's a stage defers
// past its last I -- the cool-down's W's, lag + 1 of them on stage s -- run as one batched W
// ("3W4-7", action.h), one computation and one gradient accumulation instead of lag + 1.
// Nothing waits for those W's but the end of the step (or the update), so batching them
// moves no other action; the simulator prices the batch a + b * n (simulator.h).
//
// ZB-H1-BW, p = 4, m = 8 (unit-cost slots: a batched W is one slot):
//
//   d0: 0F0 0F1 0F2 0F3  .   .   .  0I0 0W0 0F4 0I1 0W1 0F5 0I2 0W2 0F6 0I3 0W3 0F7 0I4 0W4 0I5 0W5 0I6 0W6 0I7 0W7
//   d1:  .  1F0 1F1 1F2  .   .  1I0 1F3 1I1 1W0 1F4 1I2 1W1 1F5 1I3 1W2 1F6 1I4 1W3 1F7 1I5 1W4 1I6 1W5 1I7 1W6-7
//   d2:  .   .  2F0 2F1  .  2I0 2F2 2I1 2F3 2I2 2W0 2F4 2I3 2W1 2F5 2I4 2W2 2F6 2I5 2W3 2F7 2I6 2W4 2I7 2W5-7
//   d3:  .   .   .  3F0 3I0 3F1 3I1 3F2 3I2 3F3 3I3 3W0 3F4 3I4 3W1 3F5 3I5 3W2 3F6 3I6 3W3 3F7 3I7 3W4-7
Schedule zero_bubble(int p, int m, bool h2, bool batch_w) {
  Schedule s;
  s.name = std::string(h2 ? "zb-h2" : "zb-h1") + (batch_w ? "-bw" : "");
  s.graph = StageGraph::chain(p);
  s.num_microbatches = m;
  s.per_device.resize(p);
  for (int st = 0; st < p; ++st) {
    auto& row = s.per_device[st];
    row.reserve(3 * static_cast<size_t>(m));
    auto push = [&](int mb, Kind k) { row.push_back(pass_action(st, mb, k)); };
    const int warmup = std::min(m, h2 ? 2 * (p - st) - 1 : p - st);
    const int lag = h2 ? std::min(2 * st, std::max(0, m - (p - st))) : st;
    int f = 0, w = 0;
    for (; f < warmup; ++f) push(f, Kind::F);
    for (int j = 0; j < m; ++j) {
      push(j, Kind::I);
      if (batch_w && j == m - 1) break;  // every W still pending goes into the batch below
      for (; w <= j - lag; ++w) push(w, Kind::W);
      if (f < m) push(f++, Kind::F);
    }
    if (batch_w && w < m) {
      Action a = pass_action(st, w, Kind::W);
      a.count = m - w;  // one batched W for the cool-down (count 1 is a plain W)
      row.push_back(a);
    } else {
      for (; w < m; ++w) push(w, Kind::W);
    }
  }
  return s;
}

}  // namespace pipetrain::schedule

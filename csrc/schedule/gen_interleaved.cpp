// Interleaved 1F1B (Megatron-LM's virtual pipeline): v chunks per device.
#include "schedule/generators.h"

#include <algorithm>

namespace pipetrain::schedule {

// p devices, v chunks each, p*v stages in a chain; stage k = chunk * p + device. Forwards
// go through micro-batches in groups of p: for each group, chunk 0 of the group's p
// micro-batches, then chunk 1, ...; backwards walk the chunks in reverse. Device d runs
// (p-d-1)*2 + (v-1)*p warm-up forwards (capped at m*v), then alternates one forward and one
// backward, then drains. m must be a multiple of p. p = 4, v = 2, m = 4 (unit-cost time
// slots, B one slot wide; stages 0-3 are chunk 0, stages 4-7 chunk 1):
//
//   d0: 0F0 0F1 0F2 0F3 4F0 4F1 4F2 4F3  .   .   .  4B0  .  4B1  .  4B2  .  4B3 0B0 0B1 0B2 0B3
//   d1:  .  1F0 1F1 1F2 1F3 5F0 5F1 5F2 5F3  .  5B0  .  5B1  .  5B2  .  5B3 1B0 1B1 1B2 1B3
//   d2:  .   .  2F0 2F1 2F2 2F3 6F0 6F1 6F2 6B0 6F3 6B1  .  6B2  .  6B3 2B0 2B1 2B2 2B3
//   d3:  .   .   .  3F0 3F1 3F2 3F3 7F0 7B0 7F1 7B1 7F2 7B2 7F3 7B3 3B0 3B1 3B2 3B3
//
// Peak in flight on device d: min((p-d-1)*2 + (v-1)*p + 1, m*v) stage-activations.
// Bubble (p-1)/(v*m+p-1) with equal per-stage costs. v = 1 is plain 1F1B.
Schedule interleaved_1f1b(int p, int m, int v) {
  if (v == 1) {
    Schedule s = one_f_one_b(p, m);
    s.name = "interleaved-1f1b";
    return s;
  }
  Schedule s;
  s.name = "interleaved-1f1b";
  s.graph = StageGraph::interleaved(p, v);
  s.num_microbatches = m;
  s.per_device.resize(p);
  const int total = m * v;
  auto unit = [&](int d, int k, bool forward) {
    const int group = k / (p * v), within = k % (p * v);
    int chunk = within / p;
    if (!forward) chunk = v - 1 - chunk;
    return pass_action(chunk * p + d, group * p + within % p, forward ? Kind::F : Kind::B);
  };
  for (int d = 0; d < p; ++d) {
    auto& row = s.per_device[d];
    row.reserve(2 * static_cast<size_t>(total));
    const int warmup = std::min((p - d - 1) * 2 + (v - 1) * p, total);
    int f = 0, b = 0;
    for (; f < warmup; ++f) row.push_back(unit(d, f, true));
    for (; f < total; ++f, ++b) {
      row.push_back(unit(d, f, true));
      row.push_back(unit(d, b, false));
    }
    for (; b < total; ++b) row.push_back(unit(d, b, false));
  }
  return s;
}

}  // namespace pipetrain::schedule

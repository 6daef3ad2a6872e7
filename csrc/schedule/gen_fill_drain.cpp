// GPipe (fill-drain) and 1F1B (PipeDream-Flush): one stage per device, a chain.
#include "schedule/generators.h"

#include <algorithm>

namespace pipetrain::schedule {

namespace {

Schedule chain_schedule(const char* name, int p, int m) {
  Schedule s;
  s.name = name;
  s.graph = StageGraph::chain(p);
  s.num_microbatches = m;
  s.per_device.resize(p);
  for (auto& row : s.per_device) row.reserve(2 * static_cast<size_t>(m));
  return s;
}

}  // namespace

// GPipe: every forward, then every backward, in micro-batch order (p = 4, m = 4; unit
// costs, B drawn one slot wide):
//
//   d0: 0F0 0F1 0F2 0F3  .   .   .   .   .   .  0B0 0B1 0B2 0B3
//   d1:  .  1F0 1F1 1F2 1F3  .   .   .   .  1B0 1B1 1B2 1B3
//   d2:  .   .  2F0 2F1 2F2 2F3  .   .  2B0 2B1 2B2 2B3
//   d3:  .   .   .  3F0 3F1 3F2 3F3 3B0 3B1 3B2 3B3
//
// Peak in flight: m on every stage. Bubble (p-1)/(m+p-1) with equal costs.
Schedule gpipe(int p, int m) {
  Schedule s = chain_schedule("gpipe", p, m);
  for (int st = 0; st < p; ++st) {
    for (int mb = 0; mb < m; ++mb) s.per_device[st].push_back(pass_action(st, mb, Kind::F));
    for (int mb = 0; mb < m; ++mb) s.per_device[st].push_back(pass_action(st, mb, Kind::B));
  }
  return s;
}

// 1F1B (PipeDream-Flush): stage s runs min(p-s-1, m) warm-up forwards, then alternates one
// forward and one backward, then drains the remaining backwards (p = 4, m = 6; unit-cost
// time slots, B drawn one slot wide):
//
//   d0: 0F0 0F1 0F2 0F3  .   .   .  0B0 0F4 0B1 0F5 0B2  .  0B3  .  0B4  .  0B5
//   d1:  .  1F0 1F1 1F2  .   .  1B0 1F3 1B1 1F4 1B2 1F5 1B3  .  1B4  .  1B5
//   d2:  .   .  2F0 2F1  .  2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4  .  2B5
//   d3:  .   .   .  3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5
//
// Peak in flight: min(p-s, m) on stage s. Bubble (p-1)/(m+p-1) with equal costs, as GPipe.
Schedule one_f_one_b(int p, int m) {
  Schedule s = chain_schedule("1f1b", p, m);
  for (int st = 0; st < p; ++st) {
    auto& row = s.per_device[st];
    const int warmup = std::min(p - st - 1, m);
    int f = 0, b = 0;
    for (; f < warmup; ++f) row.push_back(pass_action(st, f, Kind::F));
    for (; f < m; ++f, ++b) {
      row.push_back(pass_action(st, f, Kind::F));
      row.push_back(pass_action(st, b, Kind::B));
    }
    for (; b < m; ++b) row.push_back(pass_action(st, b, Kind::B));
  }
  return s;
}

}  // namespace pipetrain::schedule

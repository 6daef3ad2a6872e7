// build(name, ...): argument checking and dispatch to the schedule families.
#include "schedule/generators.h"

#include <cstdint>
#include <limits>
#include <stdexcept>

namespace pipetrain::schedule {

namespace {

// The one-mini-batch schedule (build() has checked the arguments common to all families).
Schedule build_one(const std::string& name, int num_stages, int num_microbatches, int num_chunks) {
  if (name == "interleaved-1f1b") {
    if (num_microbatches % num_stages != 0)
      throw std::invalid_argument(
          "interleaved-1f1b needs num_microbatches to be a multiple of num_stages (" +
          std::to_string(num_stages) + "), got " + std::to_string(num_microbatches));
    return interleaved_1f1b(num_stages, num_microbatches, num_chunks);
  }
  if (num_chunks != 1)
    throw std::invalid_argument("num_chunks applies to interleaved-1f1b only; " + name +
                                " needs num_chunks=1, got " + std::to_string(num_chunks));
  if (name == "gpipe") return gpipe(num_stages, num_microbatches);
  if (name == "1f1b") return one_f_one_b(num_stages, num_microbatches);
  const bool batch_w = name == "zb-h1-bw" || name == "zb-h2-bw";
  return zero_bubble(num_stages, num_microbatches, name == "zb-h2" || name == "zb-h2-bw",
                     batch_w);
}

}  // namespace

const std::vector<std::string>& schedule_names() {
  static const std::vector<std::string> names = {"gpipe", "1f1b", "interleaved-1f1b", "zb-h1",
                                                  "zb-h2", "zb-h1-bw", "zb-h2-bw"};
  return names;
}

Schedule over_minibatches(const Schedule& one, int T, bool updates) {
  Schedule s;
  s.name = one.name;
  s.graph = one.graph;
  s.num_microbatches = one.num_microbatches;
  s.num_minibatches = T;
  s.per_device.resize(one.num_devices());
  const int m = one.num_microbatches;
  std::vector<char> seen(one.num_stages(), 0);
  for (int d = 0; d < one.num_devices(); ++d) {
    const auto& src = one.per_device[d];
    // Position of each stage's last weight-gradient action (B or W) in the one-batch order.
    std::vector<char> last(src.size(), 0);
    for (size_t i = src.size(); i-- > 0;) {
      const Action& a = src[i];
      if (is_weight_grad(a.kind) && !seen[a.stage]) last[i] = seen[a.stage] = 1;
    }
    auto& row = s.per_device[d];
    row.reserve(static_cast<size_t>(T) * (src.size() + (updates ? 2 : 0)));
    for (int t = 0; t < T; ++t) {
      for (size_t i = 0; i < src.size(); ++i) {
        Action a = src[i];
        a.microbatch += t * m;
        if (updates) a.version = t;
        row.push_back(a);
        if (updates && last[i]) row.push_back(update_action(a.stage, t));
      }
    }
  }
  return s;
}

Schedule build(const std::string& name, int num_stages, int num_microbatches, int num_chunks,
               int num_minibatches, bool updates) {
  std::string allowed;
  for (const auto& n : schedule_names()) allowed += (allowed.empty() ? "" : ", ") + n;
  bool known = false;
  for (const auto& n : schedule_names()) known |= n == name;
  if (!known)
    throw std::invalid_argument("unknown schedule '" + name + "'; allowed: " + allowed);
  if (num_stages < 1)
    throw std::invalid_argument("num_stages must be >= 1, got " + std::to_string(num_stages));
  if (num_microbatches < 1)
    throw std::invalid_argument("num_microbatches must be >= 1, got " +
                                std::to_string(num_microbatches));
  if (num_chunks < 1)
    throw std::invalid_argument("num_chunks must be >= 1, got " + std::to_string(num_chunks));
  if (num_minibatches < 1)
    throw std::invalid_argument("num_minibatches must be >= 1, got " +
                                std::to_string(num_minibatches));
  // Limits that keep every id and the action count inside int32.
  const std::int64_t stages = static_cast<std::int64_t>(num_stages) * num_chunks;
  const std::int64_t mbs = static_cast<std::int64_t>(num_microbatches) * num_minibatches;
  if (stages * mbs * 3 + stages * num_minibatches > std::numeric_limits<std::int32_t>::max())
    throw std::invalid_argument(
        "the plan would have over 2**31 actions (stages x chunks x micro-batches x "
        "mini-batches too large)");
  Schedule one = build_one(name, num_stages, num_microbatches, num_chunks);
  if (num_minibatches == 1 && !updates) return one;
  return over_minibatches(one, num_minibatches, updates);
}

}  // namespace pipetrain::schedule

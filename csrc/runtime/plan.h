// A validated execution plan: per device, an ordered list of labelled actions and, for each,
// the actions on any device that must finish before it starts (beyond program order).
//
// Stored flat for the executor's hot loop: action g (global id) is device dev[g]'s action
// idx[g]; device d owns ids [offset[d], offset[d+1]); its dependencies are
// dep_ids[dep_begin[g] .. dep_begin[g+1]) (global ids, duplicates and same-device
// predecessors already implied by program order removed).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace pipetrain::runtime {

struct ActionSpec {
  std::string label;                        // "1F3": stage 1, forward, micro-batch 3
  std::vector<std::pair<int, int>> deps;    // (device, index) that must finish first
};

class Plan {
 public:
  // Throws std::invalid_argument naming the device, index and label of the first bad entry:
  // a dependency on a device or index that does not exist, or on an action of the same
  // device that does not come earlier (it could never be satisfied).
  static Plan build(int num_devices, const std::vector<std::vector<ActionSpec>>& actions);

  int num_devices() const { return static_cast<int>(offset.size()) - 1; }
  int size() const { return offset.back(); }
  int count(int device) const { return offset[device + 1] - offset[device]; }

  std::vector<std::int32_t> offset;
  std::vector<std::int32_t> dev, idx;
  std::vector<std::int32_t> dep_begin, dep_ids;
  std::vector<std::string> labels;
  std::vector<std::string> range_names;  // NVTX names: "1F3" -> "s1/F3"
};

// "1F3" -> "s1/F3"; a label not of the form <digits><rest> is kept as is.
std::string range_name(const std::string& label);

}  // namespace pipetrain::runtime

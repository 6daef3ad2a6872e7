// Plan validation and flattening (see plan.h).
#include "runtime/plan.h"

#include <algorithm>
#include <cctype>
#include <stdexcept>

namespace pipetrain::runtime {

std::string range_name(const std::string& label) {
  std::size_t digits = 0;
  while (digits < label.size() && std::isdigit(static_cast<unsigned char>(label[digits]))) ++digits;
  if (digits == 0 || digits == label.size()) return label;
  std::string name;
  name.reserve(label.size() + 2);
  name.push_back('s');
  name.append(label, 0, digits);
  name.push_back('/');
  name.append(label, digits, std::string::npos);
  return name;
}

Plan Plan::build(int num_devices, const std::vector<std::vector<ActionSpec>>& actions) {
  if (num_devices <= 0) throw std::invalid_argument("plan: num_devices must be positive");
  if (static_cast<int>(actions.size()) != num_devices) {
    throw std::invalid_argument("plan: expected one action list per device (" +
                                std::to_string(num_devices) + "), got " +
                                std::to_string(actions.size()));
  }
  Plan plan;
  plan.offset.assign(num_devices + 1, 0);
  for (int d = 0; d < num_devices; ++d) {
    plan.offset[d + 1] = plan.offset[d] + static_cast<std::int32_t>(actions[d].size());
  }
  const int total = plan.offset.back();
  plan.dev.resize(total);
  plan.idx.resize(total);
  plan.labels.resize(total);
  plan.range_names.resize(total);
  plan.dep_begin.assign(total + 1, 0);

  std::vector<std::int32_t> deps;
  for (int d = 0; d < num_devices; ++d) {
    for (int i = 0; i < static_cast<int>(actions[d].size()); ++i) {
      const ActionSpec& spec = actions[d][i];
      const int g = plan.offset[d] + i;
      plan.dev[g] = d;
      plan.idx[g] = i;
      plan.labels[g] = spec.label;
      plan.range_names[g] = range_name(spec.label);
      deps.clear();
      for (auto [dd, di] : spec.deps) {
        auto where = [&] {
          return "plan: device " + std::to_string(d) + " action " + std::to_string(i) + " (" +
                 spec.label + ") depends on (" + std::to_string(dd) + ", " + std::to_string(di) +
                 ")";
        };
        if (dd < 0 || dd >= num_devices) {
          throw std::invalid_argument(where() + ": device must be in [0, " +
                                      std::to_string(num_devices) + ")");
        }
        if (di < 0 || di >= static_cast<int>(actions[dd].size())) {
          throw std::invalid_argument(where() + ": index must be in [0, " +
                                      std::to_string(actions[dd].size()) + ")");
        }
        if (dd == d) {
          if (di >= i) throw std::invalid_argument(where() + ": a same-device dependency must come earlier");
          continue;  // implied by program order
        }
        deps.push_back(plan.offset[dd] + di);
      }
      std::sort(deps.begin(), deps.end());
      deps.erase(std::unique(deps.begin(), deps.end()), deps.end());
      plan.dep_ids.insert(plan.dep_ids.end(), deps.begin(), deps.end());
      plan.dep_begin[g + 1] = static_cast<std::int32_t>(plan.dep_ids.size());
    }
  }
  return plan;
}

}  // namespace pipetrain::runtime

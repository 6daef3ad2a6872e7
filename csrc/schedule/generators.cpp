// build(name, ...): argument checking and dispatch to the schedule families.
#include "schedule/generators.h"

#include <stdexcept>

namespace pipetrain::schedule {

const std::vector<std::string>& schedule_names() {
  static const std::vector<std::string> names = {"gpipe", "1f1b", "interleaved-1f1b", "zb-h1",
                                                  "zb-h2"};
  return names;
}

Schedule build(const std::string& name, int num_stages, int num_microbatches, int num_chunks) {
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
  return zero_bubble(num_stages, num_microbatches, name == "zb-h2");
}

}  // namespace pipetrain::schedule

// Grid printing: unit-slot layout of a schedule, padded into aligned columns.
#include "schedule/text.h"

#include <algorithm>
#include <vector>

#include "schedule/validator.h"

namespace pipetrain::schedule {

namespace {

std::string header(const Schedule& s) {
  const StageGraph& G = s.graph;
  std::string h = "# schedule " + (s.name.empty() ? std::string("custom") : s.name) +
                  " stages=" + std::to_string(G.num_stages()) +
                  " devices=" + std::to_string(G.num_devices()) +
                  " microbatches=" + std::to_string(s.num_microbatches);
  bool identity = G.num_stages() == G.num_devices();
  for (int st = 0; identity && st < G.num_stages(); ++st) identity = G.device_of(st) == st;
  if (!identity) {
    h += " placement=";
    for (int st = 0; st < G.num_stages(); ++st)
      h += (st ? "," : "") + std::to_string(G.device_of(st));
  }
  if (!G.is_chain()) {
    h += " edges=";
    bool first = true;
    for (auto [a, b] : G.edge_list()) {
      h += (first ? "" : ",") + std::to_string(a) + ">" + std::to_string(b);
      first = false;
    }
  }
  return h;
}

}  // namespace

std::string to_text(const Schedule& s) {
  const int D = s.num_devices();
  std::vector<std::vector<long>> slot(D);
  Validated v;
  const bool valid = validate(s, &v).ok();
  size_t width = 1;
  for (int d = 0; d < D; ++d) {
    slot[d].resize(s.per_device[d].size());
    for (size_t i = 0; i < s.per_device[d].size(); ++i) {
      slot[d][i] = static_cast<long>(i);
      width = std::max(width, to_string(s.per_device[d][i]).size());
    }
  }
  if (valid) {  // unit-slot play-out in topological order
    const DepGraph& g = v.deps;
    std::vector<long> end(g.num_actions(), 0), free_at(D, 0);
    for (int gid : v.order) {
      const int d = g.device[gid];
      long t = free_at[d];
      for (int j = g.dep_start[gid]; j < g.dep_start[gid + 1]; ++j) t = std::max(t, end[g.dep[j]]);
      end[gid] = t + 1;
      free_at[d] = t + 1;
      slot[d][gid - g.offset[d]] = t;
    }
  }
  std::string out = header(s);
  const std::string idle = std::string((width - 1) / 2, ' ') + "." + std::string(width / 2, ' ');
  for (int d = 0; d < D; ++d) {
    out += "\nd" + std::to_string(d) + ":";
    long t = 0;
    for (size_t i = 0; i < s.per_device[d].size(); ++i) {
      for (; t < slot[d][i]; ++t) out += " " + idle;
      std::string cell = to_string(s.per_device[d][i]);
      out += " " + std::string(width - cell.size(), ' ') + cell;
      ++t;
    }
  }
  return out;
}

}  // namespace pipetrain::schedule

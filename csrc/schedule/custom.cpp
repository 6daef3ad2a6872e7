// Defaults and size limits for hand-written schedules.
#include "schedule/custom.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

namespace pipetrain::schedule {

namespace {

constexpr std::int64_t kMax = std::numeric_limits<std::int32_t>::max();

[[noreturn]] void fail(const std::string& why) { throw std::invalid_argument(why); }

int checked(const char* field, std::int64_t v, std::int64_t lo = 1) {
  if (v < lo)
    fail(std::string(field) + " must be >= " + std::to_string(lo) + ", got " + std::to_string(v));
  if (v > kMax) fail(std::string(field) + " must be < 2**31, got " + std::to_string(v));
  return static_cast<int>(v);
}

}  // namespace

Schedule make_custom(CustomSpec spec) {
  // What the actions themselves say.
  std::int64_t passes = 0, max_stage = -1, max_mb = -1, max_t = -1, max_row = -1, busy_rows = 0;
  for (const auto& [d, row] : spec.rows) {
    if (d < 0) fail("device numbers are >= 0, got " + std::to_string(d));
    max_row = std::max(max_row, d);
    busy_rows += !row.empty();
    for (const Action& a : row) {
      if (!takes_version(a.kind) && a.version != kLiveWeights)
        fail("action " + to_string(a) + ": only F, B, I and W take a weight version");
      if (a.count < 1 || (a.count != 1 && a.kind != Kind::W))
        fail("action " + to_string(a) + ": only a W covers several micro-batches (count " +
             std::to_string(a.count) + ")");
      if (a.last_microbatch() > kMax)
        fail("action " + to_string(a) + ": micro-batches must be < 2**31");
      max_stage = std::max<std::int64_t>({max_stage, a.stage, a.peer});
      if (is_pass(a.kind)) ++passes;
      if (is_update(a.kind)) max_t = std::max<std::int64_t>(max_t, a.microbatch);
      else max_mb = std::max<std::int64_t>(max_mb, a.last_microbatch());
    }
  }

  Schedule s;
  s.name = spec.name;
  int S, D;
  if (spec.graph) {
    if (spec.edges || spec.placement)
      fail("give either a stage graph or edges / placement, not both");
    S = spec.graph->num_stages();
    D = spec.graph->num_devices();
    if (spec.num_stages && *spec.num_stages != S)
      fail("num_stages=" + std::to_string(*spec.num_stages) + " but the stage graph has " +
           std::to_string(S));
    if (spec.num_devices && *spec.num_devices != D)
      fail("num_devices=" + std::to_string(*spec.num_devices) + " but the stage graph has " +
           std::to_string(D));
  } else {
    const char* why = spec.num_stages   ? "as given"
                      : spec.placement ? "the placement's length"
                                       : "one more than the largest stage named";
    S = checked("num_stages", spec.num_stages    ? *spec.num_stages
                              : spec.placement ? static_cast<std::int64_t>(spec.placement->size())
                                               : max_stage + 1);
    if (S > std::max<std::int64_t>(passes, 1))
      fail("num_stages=" + std::to_string(S) + " (" + why + ") but only " +
           std::to_string(passes) +
           " F/B/I/W actions are listed: every stage needs a forward and a backward of every "
           "micro-batch, so the actions cannot fill that many stages");
    D = checked("num_devices", spec.num_devices ? *spec.num_devices : max_row + 1);
  }
  if (max_row >= D)
    fail("device " + std::to_string(max_row) + " is listed but the schedule has " +
         std::to_string(D) + " device(s)");
  // A device holds a stage or lists actions (else it is an error, below), so D <= S + the
  // rows with actions: checked before anything per device is allocated.
  if (D > S + busy_rows)
    fail("the schedule has " + std::to_string(D) + " devices (" +
         (spec.num_devices ? std::string("as given")
                           : "one more than the largest device row, d" + std::to_string(max_row)) +
         ") but only " + std::to_string(S) + " stage(s) and " + std::to_string(busy_rows) +
         " device row(s) with actions: some device would hold no stage and do nothing");

  const int T = checked("num_minibatches", spec.num_minibatches
                                               ? *spec.num_minibatches
                                               : std::max<std::int64_t>(max_t + 1, 1));
  const int m = checked("num_microbatches",
                        spec.num_microbatches ? *spec.num_microbatches
                                              : std::max<std::int64_t>((max_mb + T) / T, 1));
  if (static_cast<std::int64_t>(T) * m > kMax)
    fail("num_minibatches * num_microbatches must be < 2**31, got " + std::to_string(T) +
         " * " + std::to_string(m));
  s.num_minibatches = T;
  s.num_microbatches = m;

  // Rows, dense now that D is known to be no more than the stages.
  s.per_device.resize(D);
  for (auto& [d, row] : spec.rows) {
    auto& dst = s.per_device[static_cast<size_t>(d)];
    if (dst.empty()) dst = std::move(row);
    else dst.insert(dst.end(), row.begin(), row.end());
  }

  if (spec.graph) {
    s.graph = *spec.graph;
    return s;
  }
  std::vector<int> placement;
  if (spec.placement) {
    placement = std::move(*spec.placement);
  } else {
    placement.assign(S, -1);
    for (int d = 0; d < D; ++d)
      for (const Action& a : s.per_device[d])
        if (a.stage >= 0 && a.stage < S && placement[a.stage] < 0) placement[a.stage] = d;
    for (int st = 0; st < S; ++st)
      if (placement[st] < 0) placement[st] = st % D;
  }
  std::vector<std::pair<int, int>> edges;
  if (spec.edges) {
    edges = std::move(*spec.edges);
  } else {
    for (int st = 0; st + 1 < S; ++st) edges.emplace_back(st, st + 1);
  }
  s.graph = StageGraph(S, D, std::move(edges), std::move(placement));
  std::vector<char> holds(D, 0);
  for (int st = 0; st < S; ++st) holds[s.graph.device_of(st)] = 1;
  for (int d = 0; d < D; ++d)
    if (!holds[d] && s.per_device[d].empty())
      fail("device " + std::to_string(d) + " holds no stage and lists no action (" +
           std::to_string(S) + " stage(s) on " + std::to_string(D) + " devices)");
  return s;
}

}  // namespace pipetrain::schedule

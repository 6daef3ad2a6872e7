// The text form: grid printing (unit-slot play-out, aligned columns) and its parser.
#include "schedule/text.h"

#include <algorithm>
#include <cctype>
#include <limits>
#include <set>
#include <stdexcept>
#include <vector>

#include "schedule/custom.h"
#include "schedule/simulator.h"

namespace pipetrain::schedule {

namespace {

std::string header(const Schedule& s) {
  const StageGraph& G = s.graph;
  std::string h = "# schedule " + (s.name.empty() ? std::string("custom") : s.name) +
                  " stages=" + std::to_string(G.num_stages()) +
                  " devices=" + std::to_string(G.num_devices()) +
                  " microbatches=" + std::to_string(s.num_microbatches);
  if (s.num_minibatches != 1) h += " minibatches=" + std::to_string(s.num_minibatches);
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

bool blank(char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; }

std::string_view trim(std::string_view s) {
  while (!s.empty() && blank(s.front())) s.remove_prefix(1);
  while (!s.empty() && blank(s.back())) s.remove_suffix(1);
  return s;
}

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (true) {
    size_t j = s.find(sep, i);
    out.push_back(s.substr(i, j == std::string_view::npos ? std::string_view::npos : j - i));
    if (j == std::string_view::npos) break;
    i = j + 1;
  }
  return out;
}

std::vector<std::string_view> words(std::string_view s) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && blank(s[i])) ++i;
    size_t j = i;
    while (j < s.size() && !blank(s[j])) ++j;
    if (j > i) out.push_back(s.substr(i, j - i));
    i = j;
  }
  return out;
}

// A non-negative decimal number naming `what`; one that does not fit int32 is an error.
std::int64_t number(std::string_view text, const std::string& what) {
  if (text.empty()) throw std::invalid_argument(what + ": expected a number, got ''");
  std::int64_t v = 0;
  for (char c : text) {
    if (!std::isdigit(static_cast<unsigned char>(c)))
      throw std::invalid_argument(what + ": expected a number, got '" + std::string(text) + "'");
    v = v * 10 + (c - '0');
    if (v > std::numeric_limits<std::int32_t>::max())
      throw std::invalid_argument(what + " is too large: numbers must be < 2**31, got '" +
                                  std::string(text) + "'");
  }
  return v;
}

// Reads "key=value" words of a "# schedule" header into spec.
void read_header(const std::vector<std::string_view>& ws, CustomSpec* spec) {
  if (ws.size() > 1 && ws[1].find('=') == std::string_view::npos) spec->name = std::string(ws[1]);
  for (std::string_view w : ws) {
    const size_t eq = w.find('=');
    if (eq == std::string_view::npos) continue;
    const std::string_view key = w.substr(0, eq), value = w.substr(eq + 1);
    const std::string what = std::string(key) + "=";
    if (key == "stages") spec->num_stages = number(value, what);
    else if (key == "devices") spec->num_devices = number(value, what);
    else if (key == "microbatches") spec->num_microbatches = number(value, what);
    else if (key == "minibatches") spec->num_minibatches = number(value, what);
    else if (key == "placement") {
      std::vector<int> p;
      for (auto x : split(value, ',')) p.push_back(static_cast<int>(number(x, "placement=")));
      spec->placement = std::move(p);
    } else if (key == "edges") {
      std::vector<std::pair<int, int>> e;
      for (auto x : split(value, ',')) {
        auto ab = split(x, '>');
        if (ab.size() != 2)
          throw std::invalid_argument("edges=: expected <from>><to>, got '" + std::string(x) + "'");
        e.emplace_back(static_cast<int>(number(ab[0], "edges=")),
                       static_cast<int>(number(ab[1], "edges=")));
      }
      spec->edges = std::move(e);
    }  // other keys: free-form comment words
  }
}

}  // namespace

std::string to_text(const Schedule& s) {
  const int D = s.num_devices();
  std::vector<std::vector<long>> slot(D);
  size_t width = 1;
  for (int d = 0; d < D; ++d) {
    slot[d].resize(s.per_device[d].size());
    for (size_t i = 0; i < s.per_device[d].size(); ++i) {
      slot[d][i] = static_cast<long>(i);
      width = std::max(width, to_string(s.per_device[d][i]).size());
    }
  }
  Validated v;
  if (validate(s, &v).ok()) {  // unit slots: every action one slot long, no latency
    Durations unit(s.num_stages(), 1.0);
    unit.weight_fixed.assign(s.num_stages(), 1.0);  // a batched W is one slot too
    const PlayOut p = play_out(s, v, unit, 0.0);
    for (int d = 0; d < D; ++d)
      for (size_t i = 0; i < slot[d].size(); ++i) slot[d][i] = static_cast<long>(p.start[d][i]);
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

Schedule parse_text(std::string_view text) {
  CustomSpec spec;
  std::set<std::int64_t> seen;
  int lineno = 0;
  for (std::string_view raw : split(text, '\n')) {
    ++lineno;
    const std::string_view line = trim(raw);
    const std::string where = "line " + std::to_string(lineno) + ": ";
    if (line.empty()) continue;
    try {
      if (line.front() == '#') {
        auto ws = words(line.substr(1));
        if (!ws.empty() && ws[0] == "schedule") read_header(ws, &spec);
        continue;
      }
      const size_t colon = line.find(':');
      const std::string_view head =
          colon == std::string_view::npos ? line : trim(line.substr(0, colon));
      bool is_row = colon != std::string_view::npos && head.size() > 1 && head[0] == 'd';
      for (size_t i = 1; is_row && i < head.size(); ++i)
        is_row = std::isdigit(static_cast<unsigned char>(head[i])) != 0;
      if (!is_row)
        throw std::invalid_argument("expected 'd<device>: <actions>', got '" +
                                    std::string(line) + "'");
      const std::int64_t device = number(head.substr(1), "device number");
      if (!seen.insert(device).second)
        throw std::invalid_argument("device " + std::to_string(device) + " listed twice");
      std::vector<Action> row;
      for (std::string_view tok : words(line.substr(colon + 1)))
        if (tok != ".") row.push_back(parse_action(tok));
      spec.rows.emplace_back(device, std::move(row));
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(where + e.what());
    }
  }
  if (spec.rows.empty())
    throw std::invalid_argument("no device rows ('d0: ...') in the schedule text");
  return make_custom(std::move(spec));
}

}  // namespace pipetrain::schedule

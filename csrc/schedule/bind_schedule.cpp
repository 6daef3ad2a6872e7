// Binds the schedule component into pipetrain._C.schedule (Python wrapper: pipetrain.schedules).
//
// The Python side holds a Schedule by value; its validation (dependency graph and a
// topological order) is computed once and cached, since dependencies(device) is asked for
// device by device and simulate() reuses it. No per-action Python objects are created
// unless actions(device) is asked for. Actions cross as tuples
// (kind index, stage, micro-batch, peer, version, label, count), kinds indexed as
// kind_names(); count > 1 only for a batched W.
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <tuple>

#include "bindings.h"
#include "schedule/bind_stage_graph.h"
#include "schedule/custom.h"
#include "schedule/generators.h"
#include "schedule/lower.h"
#include "schedule/simulator.h"
#include "schedule/text.h"
#include "schedule/validator.h"

namespace py = pybind11;

namespace pipetrain {

namespace {

using namespace pipetrain::schedule;

using RawAction = std::tuple<int, int, int, int, int, std::string, int>;

RawAction raw(const Action& a) {
  return {static_cast<int>(a.kind), a.stage, a.microbatch, a.peer, a.version, to_string(a),
          a.count};
}

class PySchedule {
 public:
  explicit PySchedule(Schedule s) : s_(std::move(s)) {}

  const Schedule& get() const { return s_; }

  // (rule, device, index, action, message), or None when the schedule is valid.
  py::object violation() const {
    const Violation& v = check();
    if (v.ok()) return py::none();
    return py::make_tuple(rule_name(v.rule), v.device, v.index, v.action, v.message);
  }

  const Validated& valid() const {
    const Violation& v = check();
    if (!v.ok()) throw std::runtime_error("invalid schedule: " + v.message);
    return *validated_;
  }

  void check_device(int d) const {
    if (d < 0 || d >= s_.num_devices())
      throw py::index_error("device " + std::to_string(d) + " out of range 0.." +
                            std::to_string(s_.num_devices() - 1));
  }

  std::vector<RawAction> actions(int d) const {
    check_device(d);
    std::vector<RawAction> out;
    out.reserve(s_.per_device[d].size());
    for (const Action& a : s_.per_device[d]) out.push_back(raw(a));
    return out;
  }

  std::vector<std::vector<std::pair<int, int>>> dependencies(int d) const {
    check_device(d);
    const DepGraph& g = valid().deps;
    std::vector<std::vector<std::pair<int, int>>> out(s_.per_device[d].size());
    for (size_t i = 0; i < out.size(); ++i) {
      const int gid = g.offset[d] + static_cast<int>(i);
      for (int j = g.dep_start[gid]; j < g.dep_start[gid + 1]; ++j) {
        const int x = g.dep[j];
        out[i].emplace_back(g.device[x], g.index_of(x));
      }
    }
    return out;
  }

  SimResult simulate(std::vector<double> f, std::vector<double> b,
                     std::optional<std::vector<double>> w, std::vector<double> u,
                     double transfer, std::vector<double> w_fixed) const {
    Costs c;
    c.weight_fixed = std::move(w_fixed);
    c.forward = std::move(f);
    c.backward = std::move(b);
    c.weight_given = w.has_value();
    if (w) c.weight = std::move(*w);
    c.update = std::move(u);
    c.transfer = transfer;
    return schedule::simulate(s_, valid(), c);
  }

 private:
  const Violation& check() const {
    if (!validated_) {
      validated_ = std::make_unique<Validated>();
      violation_ = validate(s_, validated_.get());
    }
    return violation_;
  }

  Schedule s_;
  mutable std::unique_ptr<Validated> validated_;
  mutable Violation violation_;
};

// A str ("1F3@2") or an object with .kind .stage .microbatch .peer .version (Action).
Action action_arg(py::handle h) {
  if (py::isinstance<py::str>(h)) return parse_action(h.cast<std::string>());
  for (const char* field : {"kind", "stage", "microbatch", "peer", "version"})
    if (!py::hasattr(h, field))
      throw py::value_error("actions are strings ('1F3@0') or Action objects, got " +
                            std::string(py::repr(h)));
  Action a;
  const std::string kind = py::str(h.attr("kind"));
  if (!kind_from_name(kind, &a.kind))
    throw py::value_error("unknown action kind '" + kind +
                          "'; allowed: F, B, I, W, U, SF, RF, SB, RB");
  a.stage = int32_arg(h.attr("stage"), "stage");
  a.microbatch = int32_arg(h.attr("microbatch"), is_update(a.kind) ? "mini-batch" : "microbatch");
  a.peer = is_transfer(a.kind) ? int32_arg(h.attr("peer"), "peer") : -1;
  a.version = int32_arg(h.attr("version"), "version");
  // A batched W covers `count` micro-batches (Action objects without the field: one).
  a.count = py::hasattr(h, "count") ? int32_arg(h.attr("count"), "count") : 1;
  if (a.count < 1 || (a.count != 1 && a.kind != Kind::W))
    throw py::value_error("count (micro-batches covered) is >= 1, and above 1 only for a W; got " +
                          std::to_string(a.count) + " on " + kind);
  if (is_transfer(a.kind) && a.peer < 0)
    throw py::value_error("transfer action needs a peer stage");
  return a;
}

std::optional<std::int64_t> opt_int(const py::object& o, const char* field) {
  if (o.is_none()) return std::nullopt;
  return int32_arg(o, field);
}

}  // namespace

void bind_schedule(py::module_& m) {
  bind_stage_graph(m);

  py::class_<SimResult>(m, "SimResult", "simulation result (see pipetrain.schedules)")
      .def_readonly("makespan", &SimResult::makespan)
      .def_readonly("bubble_ratio", &SimResult::bubble_ratio)
      .def_readonly("busy", &SimResult::busy)
      .def_readonly("idle", &SimResult::idle)
      .def_readonly("peak_inflight", &SimResult::peak_inflight)
      .def("starts", [](const SimResult& r, int d) { return r.start.at(d); })
      .def("ends", [](const SimResult& r, int d) { return r.end.at(d); });

  py::class_<PySchedule>(m, "Schedule", "schedule IR (use pipetrain.schedules)")
      .def_property_readonly("name", [](const PySchedule& p) { return p.get().name; })
      .def_property_readonly("num_devices", [](const PySchedule& p) { return p.get().num_devices(); })
      .def_property_readonly("num_stages", [](const PySchedule& p) { return p.get().num_stages(); })
      .def_property_readonly("num_microbatches",
                             [](const PySchedule& p) { return p.get().num_microbatches; })
      .def_property_readonly("num_minibatches",
                             [](const PySchedule& p) { return p.get().num_minibatches; })
      .def_property_readonly("num_actions", [](const PySchedule& p) { return p.get().num_actions(); })
      .def_property_readonly("lowered", [](const PySchedule& p) { return p.get().lowered(); })
      .def_property_readonly("split_backward",
                             [](const PySchedule& p) { return p.get().split_backward(); })
      .def_property_readonly("has_updates", [](const PySchedule& p) { return p.get().has_updates(); })
      .def_property_readonly("versioned", [](const PySchedule& p) { return p.get().versioned(); })
      .def_property_readonly(
          "stage_graph", [](const PySchedule& p) -> const StageGraph& { return p.get().graph; },
          py::return_value_policy::reference_internal)
      .def("num_actions_on", [](const PySchedule& p, int d) { p.check_device(d); return p.get().per_device[d].size(); })
      .def("actions", &PySchedule::actions, py::arg("device"))
      .def("dependencies", &PySchedule::dependencies, py::arg("device"))
      .def("violation", &PySchedule::violation)
      .def("simulate", &PySchedule::simulate, py::arg("forward"), py::arg("backward"),
           py::arg("weight"), py::arg("update"), py::arg("transfer"),
           py::arg("weight_fixed") = std::vector<double>())
      .def("peak_inflight", [](const PySchedule& p) { return peak_inflight(p.get()); })
      .def("text", [](const PySchedule& p) { return to_text(p.get()); })
      .def("lower", [](const PySchedule& p) { return PySchedule(lower(p.get())); });

  m.def("names", &schedule_names, "schedule names build() accepts");
  m.def("kind_names", [] {
    std::vector<std::string> out;
    for (Kind k : kAllKinds) out.push_back(kind_name(k));
    return out;
  }, "action kinds, in the order of the kind index actions carry");
  m.def("parse_action", [](const std::string& text) { return raw(parse_action(text)); },
        py::arg("text"));
  m.def("action_label", [](py::handle action) { return to_string(action_arg(action)); },
        py::arg("action"), "the text form of an Action-like object");
  m.def("parse", [](const std::string& text) { return PySchedule(parse_text(text)); },
        py::arg("text"));
  m.def(
      "build",
      [](const std::string& name, int p, int mb, int v, int T, bool updates) {
        return PySchedule(build(name, p, mb, v, T, updates));
      },
      py::arg("name"), py::arg("num_stages"), py::arg("num_microbatches"),
      py::arg("num_chunks") = 1, py::arg("num_minibatches") = 1, py::arg("updates") = false);
  m.def(
      "from_actions",
      [](const py::sequence& rows, const py::object& num_stages, const py::object& num_microbatches,
         const py::object& num_minibatches, const py::object& edges, const py::object& placement,
         const py::object& graph, std::string name) {
        CustomSpec spec;
        spec.name = std::move(name);
        std::int64_t d = 0;
        for (auto row : rows) {
          std::vector<Action> acts;
          for (auto a : row.cast<py::sequence>()) acts.push_back(action_arg(a));
          spec.rows.emplace_back(d++, std::move(acts));
        }
        if (d < 1) throw py::value_error("a schedule needs at least one device (one action list)");
        spec.num_devices = d;
        spec.num_stages = opt_int(num_stages, "num_stages");
        spec.num_microbatches = opt_int(num_microbatches, "num_microbatches");
        spec.num_minibatches = opt_int(num_minibatches, "num_minibatches");
        if (!edges.is_none()) {
          std::vector<std::pair<int, int>> e;
          for (auto x : edges.cast<py::sequence>()) {
            auto pair = x.cast<py::sequence>();
            if (pair.size() != 2) throw py::value_error("an edge is a pair (src, dst)");
            e.emplace_back(int32_arg(pair[0], "edge src"), int32_arg(pair[1], "edge dst"));
          }
          spec.edges = std::move(e);
        }
        if (!placement.is_none()) {
          std::vector<int> p;
          for (auto x : placement.cast<py::sequence>()) p.push_back(int32_arg(x, "placement"));
          spec.placement = std::move(p);
        }
        if (!graph.is_none()) spec.graph = &graph.cast<const StageGraph&>();
        return PySchedule(make_custom(std::move(spec)));
      },
      py::arg("rows"), py::arg("num_stages") = py::none(), py::arg("num_microbatches") = py::none(),
      py::arg("num_minibatches") = py::none(), py::arg("edges") = py::none(),
      py::arg("placement") = py::none(), py::arg("graph") = py::none(),
      py::arg("name") = "custom");
}

}  // namespace pipetrain

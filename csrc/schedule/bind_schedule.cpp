// Binds the schedule component into pipetrain._C.schedule (Python wrapper: pipetrain.schedules).
//
// The Python side holds a Schedule by value; its validation (dependency graph and a
// topological order) is computed once and cached, since dependencies(device) is asked for
// device by device and simulate() reuses it. No per-action Python objects are created
// unless actions(device) is asked for.
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <tuple>

#include "bindings.h"
#include "schedule/generators.h"
#include "schedule/lower.h"
#include "schedule/simulator.h"
#include "schedule/text.h"
#include "schedule/validator.h"

namespace py = pybind11;

namespace pipetrain {

namespace {

using namespace pipetrain::schedule;

using RawAction = std::tuple<std::string, int, int, int>;  // (kind, stage, microbatch, peer)

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
  void check_stage(int st) const {
    if (st < 0 || st >= s_.num_stages())
      throw py::index_error("stage " + std::to_string(st) + " out of range 0.." +
                            std::to_string(s_.num_stages() - 1));
  }

  std::vector<RawAction> actions(int d) const {
    check_device(d);
    std::vector<RawAction> out;
    out.reserve(s_.per_device[d].size());
    for (const Action& a : s_.per_device[d])
      out.emplace_back(kind_name(a.kind), a.stage, a.microbatch, a.peer);
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

  SimResult simulate(std::vector<double> f, std::vector<double> b, std::optional<std::vector<double>> w,
                     double transfer) const {
    Costs c;
    c.forward = std::move(f);
    c.backward = std::move(b);
    c.weight_given = w.has_value();
    if (w) c.weight = std::move(*w);
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

Action parse_raw(const RawAction& r) {
  Action a;
  const auto& [kind, stage, mb, peer] = r;
  if (!kind_from_name(kind, &a.kind))
    throw std::invalid_argument("unknown action kind '" + kind +
                                "'; allowed: F, B, I, W, SF, RF, SB, RB");
  a.stage = stage;
  a.microbatch = mb;
  a.peer = is_transfer(a.kind) ? peer : -1;
  if (is_transfer(a.kind) && peer < 0)
    throw std::invalid_argument("transfer action needs a peer stage");
  return a;
}

}  // namespace

void bind_schedule(py::module_& m) {
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
      .def_property_readonly("num_actions", [](const PySchedule& p) { return p.get().num_actions(); })
      .def_property_readonly("lowered", [](const PySchedule& p) { return p.get().lowered(); })
      .def_property_readonly("split_backward",
                             [](const PySchedule& p) { return p.get().split_backward(); })
      .def_property_readonly("edges", [](const PySchedule& p) { return p.get().graph.edge_list(); })
      .def_property_readonly("placement", [](const PySchedule& p) { return p.get().graph.devices(); })
      .def("device_of", [](const PySchedule& p, int st) { p.check_stage(st); return p.get().graph.device_of(st); })
      .def("chunk_of", [](const PySchedule& p, int st) { p.check_stage(st); return p.get().graph.chunk_of(st); })
      .def("predecessors", [](const PySchedule& p, int st) { p.check_stage(st); return p.get().graph.predecessors(st); })
      .def("successors", [](const PySchedule& p, int st) { p.check_stage(st); return p.get().graph.successors(st); })
      .def("num_actions_on", [](const PySchedule& p, int d) { p.check_device(d); return p.get().per_device[d].size(); })
      .def("actions", &PySchedule::actions, py::arg("device"))
      .def("dependencies", &PySchedule::dependencies, py::arg("device"))
      .def("violation", &PySchedule::violation)
      .def("simulate", &PySchedule::simulate, py::arg("forward"), py::arg("backward"),
           py::arg("weight"), py::arg("transfer"))
      .def("peak_inflight", [](const PySchedule& p) { return peak_inflight(p.get()); })
      .def("text", [](const PySchedule& p) { return to_text(p.get()); })
      .def("lower", [](const PySchedule& p) { return PySchedule(lower(p.get())); });

  m.def("names", &schedule_names, "schedule names build() accepts");
  m.def(
      "build",
      [](const std::string& name, int p, int mb, int v) { return PySchedule(build(name, p, mb, v)); },
      py::arg("name"), py::arg("num_stages"), py::arg("num_microbatches"), py::arg("num_chunks") = 1);
  m.def(
      "from_actions",
      [](const std::vector<std::vector<RawAction>>& rows, int num_stages, int num_microbatches,
         std::vector<std::pair<int, int>> edges, std::vector<int> placement, int num_devices,
         std::string name) {
        if (num_microbatches < 1)
          throw std::invalid_argument("num_microbatches must be >= 1, got " +
                                      std::to_string(num_microbatches));
        if (static_cast<int>(rows.size()) != num_devices)
          throw std::invalid_argument("need one action list per device (" +
                                      std::to_string(num_devices) + "), got " +
                                      std::to_string(rows.size()));
        Schedule s;
        s.name = std::move(name);
        s.graph = StageGraph(num_stages, num_devices, std::move(edges), std::move(placement));
        s.num_microbatches = num_microbatches;
        s.per_device.resize(num_devices);
        for (int d = 0; d < num_devices; ++d) {
          s.per_device[d].reserve(rows[d].size());
          for (const auto& r : rows[d]) s.per_device[d].push_back(parse_raw(r));
        }
        return PySchedule(std::move(s));
      },
      py::arg("rows"), py::arg("num_stages"), py::arg("num_microbatches"), py::arg("edges"),
      py::arg("placement"), py::arg("num_devices"), py::arg("name") = "custom");
}

}  // namespace pipetrain

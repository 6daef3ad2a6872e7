// The stage graph as a bound object: the engine builds its stages from it, so the graph is
// kept once, in C++ (Schedule.stage_graph returns the schedule's own graph).
#include "schedule/bind_stage_graph.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "schedule/stage_graph.h"

namespace py = pybind11;

namespace pipetrain {

using schedule::StageGraph;

namespace {

struct Edge {
  int id, src, dst;
  std::string name;  // "0->1"
};

struct StageInfo {
  int id, device, chunk;
  std::vector<int> inputs;   // edge ids, in predecessor order
  std::vector<int> outputs;  // edge ids, in successor order
};

void check_stage(const StageGraph& g, int k) {
  if (k < 0 || k >= g.num_stages())
    throw py::index_error("stage " + std::to_string(k) + " out of range 0.." +
                          std::to_string(g.num_stages() - 1));
}

Edge edge_of(const StageGraph& g, int e) {
  if (e < 0 || e >= g.num_edges())
    throw py::index_error("edge " + std::to_string(e) + " out of range 0.." +
                          std::to_string(g.num_edges() - 1));
  const auto [a, b] = g.edge_list()[e];
  return Edge{e, a, b, std::to_string(a) + "->" + std::to_string(b)};
}

StageInfo stage_of(const StageGraph& g, int k) {
  check_stage(g, k);
  StageInfo s{k, g.device_of(k), g.chunk_of(k), {}, {}};
  for (int j = g.pred_begin(k); j < g.pred_end(k); ++j) s.inputs.push_back(g.pred_edge_at(j));
  for (int e = g.succ_begin(k); e < g.succ_end(k); ++e) s.outputs.push_back(e);
  return s;
}

std::string ints(const std::vector<int>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

}  // namespace

std::int32_t int32_arg(py::handle value, const std::string& field) {
  if (!PyLong_Check(value.ptr()) || PyBool_Check(value.ptr()))
    throw py::value_error(field + " must be an int, got " + std::string(py::repr(value)));
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
  if (overflow != 0 || v > std::numeric_limits<std::int32_t>::max() ||
      v < std::numeric_limits<std::int32_t>::min())
    throw py::value_error(field + " is out of range: numbers must be < 2**31 (int32), got " +
                          std::string(py::str(value)));
  return static_cast<std::int32_t>(v);
}

void bind_stage_graph(py::module_& m) {
  py::class_<Edge>(m, "Edge", "a stage edge: data flows src -> dst; id = the C++ edge id")
      .def_readonly("id", &Edge::id)
      .def_readonly("src", &Edge::src)
      .def_readonly("dst", &Edge::dst)
      .def_readonly("name", &Edge::name)
      .def("__repr__", [](const Edge& e) {
        return "Edge(id=" + std::to_string(e.id) + ", " + e.name + ")";
      });

  py::class_<StageInfo>(m, "StageInfo", "one stage: where it lives and its edges")
      .def_readonly("id", &StageInfo::id)
      .def_readonly("device", &StageInfo::device)
      .def_readonly("chunk", &StageInfo::chunk)
      .def_readonly("inputs", &StageInfo::inputs)
      .def_readonly("outputs", &StageInfo::outputs)
      .def("__repr__", [](const StageInfo& s) {
        return "StageInfo(id=" + std::to_string(s.id) + ", device=" + std::to_string(s.device) +
               ", chunk=" + std::to_string(s.chunk) + ", inputs=" + ints(s.inputs) +
               ", outputs=" + ints(s.outputs) + ")";
      });

  py::class_<StageGraph>(m, "StageGraph",
                         "stages by id, explicit edges (CSR, ids sorted by (src, dst)) and a "
                         "placement stage -> device")
      .def(py::init([](const py::sequence& placement, std::optional<py::sequence> edges,
                       std::optional<py::object> num_devices) {
             std::vector<int> place;
             int devices = 0;
             for (auto x : placement) {
               place.push_back(int32_arg(x, "placement"));
               devices = std::max(devices, place.back() + 1);
             }
             if (num_devices && !num_devices->is_none())
               devices = int32_arg(*num_devices, "num_devices");
             std::vector<std::pair<int, int>> e;
             if (edges) {
               for (auto x : *edges) {
                 auto pair = x.cast<py::sequence>();
                 if (pair.size() != 2) throw py::value_error("an edge is a pair (src, dst)");
                 e.emplace_back(int32_arg(pair[0], "edge src"), int32_arg(pair[1], "edge dst"));
               }
             } else {
               for (size_t k = 0; k + 1 < place.size(); ++k)
                 e.emplace_back(static_cast<int>(k), static_cast<int>(k) + 1);
             }
             const int stages = static_cast<int>(place.size());
             return StageGraph(stages, devices, std::move(e), std::move(place));
           }),
           py::arg("placement"), py::arg("edges") = py::none(), py::arg("num_devices") = py::none(),
           "placement[k] = device of stage k; edges default to the chain 0 -> 1 -> ...")
      .def_static("chain", &StageGraph::chain, py::arg("num_stages"))
      .def_static("interleaved", &StageGraph::interleaved, py::arg("num_devices"),
                  py::arg("num_chunks"))
      .def_property_readonly("num_stages", &StageGraph::num_stages)
      .def_property_readonly("num_devices", &StageGraph::num_devices)
      .def_property_readonly("num_edges", &StageGraph::num_edges)
      .def_property_readonly("is_chain", &StageGraph::is_chain)
      .def_property_readonly("placement", &StageGraph::devices)
      .def_property_readonly("edges", [](const StageGraph& g) {
        std::vector<Edge> out;
        for (int e = 0; e < g.num_edges(); ++e) out.push_back(edge_of(g, e));
        return out;
      })
      .def("edge", &edge_of, py::arg("id"))
      .def("stage", &stage_of, py::arg("id"))
      .def_property_readonly("stages", [](const StageGraph& g) {
        std::vector<StageInfo> out;
        for (int k = 0; k < g.num_stages(); ++k) out.push_back(stage_of(g, k));
        return out;
      })
      .def("device_of",
           [](const StageGraph& g, int k) { check_stage(g, k); return g.device_of(k); })
      .def("chunk_of",
           [](const StageGraph& g, int k) { check_stage(g, k); return g.chunk_of(k); })
      .def("predecessors",
           [](const StageGraph& g, int k) { check_stage(g, k); return g.predecessors(k); })
      .def("successors",
           [](const StageGraph& g, int k) { check_stage(g, k); return g.successors(k); })
      .def("sources", &StageGraph::sources)
      .def("sinks", &StageGraph::sinks)
      .def("topological_order", &StageGraph::topological_order)
      .def("__repr__", [](const StageGraph& g) {
        std::string s = "StageGraph(stages=" + std::to_string(g.num_stages()) +
                        ", devices=" + std::to_string(g.num_devices()) + ", edges=[";
        for (int e = 0; e < g.num_edges(); ++e) {
          const auto [a, b] = g.edge_list()[e];
          s += (e ? ", " : "") + std::to_string(a) + "->" + std::to_string(b);
        }
        return s + "], placement=" + ints(g.devices()) + ")";
      });
}

}  // namespace pipetrain

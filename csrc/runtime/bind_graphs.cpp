// _C.runtime.HostGraphs: CPU host graphs for the executor's graph-launch path (tests).
//
// Each graph counts its launches and whether the launching thread held the GIL, so a test
// can check that the executor runs a captured action without calling into Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "bindings.h"
#include "runtime/graph_launch.h"

namespace py = pybind11;

namespace pipetrain {
namespace {

class HostGraphs {
 public:
  explicit HostGraphs(int n) : slots_(n), counts_(n) {
    if (n < 0) throw std::invalid_argument("HostGraphs: n must be >= 0");
    for (int i = 0; i < n; ++i) {
      slots_[i] = {this, i};
      graphs_.push_back({&HostGraphs::launch, &slots_[i]});
    }
    for (auto& c : counts_) c.store(0);
  }
  std::uint64_t handle(int i) const {
    if (i < 0 || i >= static_cast<int>(graphs_.size())) throw py::index_error("graph out of range");
    return reinterpret_cast<std::uint64_t>(&graphs_[i]);
  }
  std::vector<int> counts() const {
    std::vector<int> out;
    for (const auto& c : counts_) out.push_back(c.load());
    return out;
  }
  int launched_with_gil() const { return with_gil_.load(); }

 private:
  struct Slot {
    HostGraphs* owner;
    int index;
  };
  static void launch(void* arg) {
    auto* slot = static_cast<Slot*>(arg);
    slot->owner->counts_[slot->index].fetch_add(1);
    if (PyGILState_Check()) slot->owner->with_gil_.fetch_add(1);
  }
  std::vector<Slot> slots_;
  std::vector<runtime::HostGraph> graphs_;
  std::vector<std::atomic<int>> counts_;
  std::atomic<int> with_gil_{0};
};

}  // namespace

void bind_graphs(py::module_& m) {
  py::class_<HostGraphs>(m, "HostGraphs",
                         "n CPU host graphs for Executor.run(graphs=...): each counts its "
                         "launches and whether the GIL was held (tests of the launch path)")
      .def(py::init<int>(), py::arg("n"))
      .def("handle", &HostGraphs::handle, py::arg("i"), "graph i's handle for the graph table")
      .def("counts", &HostGraphs::counts, "launches per graph")
      .def_property_readonly("launched_with_gil", &HostGraphs::launched_with_gil);
}

}  // namespace pipetrain

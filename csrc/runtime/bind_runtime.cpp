// Binds the runtime into pipetrain._C.runtime: Backend (streams, events, copies), Plan,
// Executor. The Python wrapper is engine/executor.py; this layer only converts types, owns
// the GIL protocol (PyHost) and turns action failures into a status the wrapper raises.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "bindings.h"
#include "runtime/backend.h"
#include "runtime/executor.h"
#include "runtime/plan.h"

namespace py = pybind11;

namespace pipetrain {
namespace {

using runtime::Backend;
using runtime::Handle;

// Each issuing thread gets its own PyThreadState, registered as the thread's GILState
// state (PyGILState_Ensure on the thread itself), so code inside an action that calls
// PyGILState_Ensure (pybind11, torch) finds it instead of deadlocking on a second one.
// enter/leave are then a plain PyEval_RestoreThread/SaveThread: no allocation.
class PyHost final : public runtime::HostContext {
 public:
  explicit PyHost(int n) : gil_(n), ts_(n, nullptr) {}
  void attach(int d) override {
    gil_[d] = PyGILState_Ensure();
    ts_[d] = PyEval_SaveThread();
  }
  void detach(int d) override {
    PyEval_RestoreThread(ts_[d]);
    PyGILState_Release(gil_[d]);
  }
  void enter(int d) override { PyEval_RestoreThread(ts_[d]); }
  void leave(int d) override { ts_[d] = PyEval_SaveThread(); }
  bool poll() override {
    // Runs on the thread that called run(), which released the GIL: let Ctrl-C through.
    PyGILState_STATE s = PyGILState_Ensure();
    const bool ok = PyErr_CheckSignals() == 0;
    if (!ok) {
      py::object error = fetch_error();  // a second Ctrl-C: keep the first, drop this one
      if (!interrupt_) interrupt_ = std::move(error);
    }
    PyGILState_Release(s);
    return ok;
  }
  // Needs the GIL.
  py::object take_interrupt() {
    py::object error = std::exchange(interrupt_, py::object());
    return error ? error : py::none();
  }

  static py::object fetch_error() {
    PyObject *type = nullptr, *value = nullptr, *tb = nullptr;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb && value) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return py::reinterpret_steal<py::object>(value);
  }

 private:
  std::vector<PyGILState_STATE> gil_;
  std::vector<PyThreadState*> ts_;
  py::object interrupt_;
};

// The per-run Python callable and the exception each device's action raised.
struct PyAction {
  py::object fn;
  std::vector<py::object> errors;
};

// run_action(device, index) with the GIL held: one vectorcall, two small ints.
bool call_action(void* ctx, int device, int index) {
  auto* action = static_cast<PyAction*>(ctx);
  PyObject* args[3] = {nullptr, PyLong_FromLong(device), PyLong_FromLong(index)};
  PyObject* result = PyObject_Vectorcall(action->fn.ptr(), args + 1,
                                         2 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr);
  Py_DECREF(args[1]);
  Py_DECREF(args[2]);
  if (result == nullptr) {
    action->errors[device] = PyHost::fetch_error();
    return false;
  }
  Py_DECREF(result);
  return true;
}

// A backend as seen from Python: the CPU singleton, or the CUDA one from _C_cuda's capsule
// (kept alive through `owner`).
struct PyBackend {
  Backend* impl;
  py::object owner;
};

PyBackend backend_from_capsule(const py::capsule& capsule) {
  if (std::string(capsule.name() ? capsule.name() : "") != runtime::kBackendCapsule) {
    throw std::invalid_argument(std::string("expected a capsule named ") + runtime::kBackendCapsule);
  }
  return {capsule.get_pointer<Backend>(), capsule};
}

void run_py_callback(void* arg) {
  py::gil_scoped_acquire gil;
  auto* fn = static_cast<py::object*>(arg);
  try {
    (*fn)();
  } catch (py::error_already_set& err) {
    err.discard_as_unraisable("pipetrain host_callback");
  }
  delete fn;
}

// PySequence_Fast view of `obj` (a new reference) or an invalid_argument naming what()
// (a callable, so the message is only built on error).
template <class What>
py::object fast_sequence(PyObject* obj, const What& what) {
  PyObject* seq = PySequence_Fast(obj, "");
  if (seq == nullptr) {
    PyErr_Clear();
    throw std::invalid_argument("plan: " + what() + " must be a sequence");
  }
  return py::reinterpret_steal<py::object>(seq);
}

template <class What>
int as_int(PyObject* obj, const What& what) {
  const long value = PyLong_AsLong(obj);
  if (value == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw std::invalid_argument("plan: " + what() + " must be an int");
  }
  if (value < INT32_MIN || value > INT32_MAX) throw std::invalid_argument("plan: " + what() + " out of range");
  return static_cast<int>(value);
}

std::shared_ptr<const runtime::Plan> build_plan(int num_devices, const py::handle& plan) {
  // Hand-converted with the sequence-fast C API (a plan given as lists is rebuilt every
  // run): measured 0.33 us per action including validation, against 0.93 with pybind11's
  // generic sequence access. A label may be any object; str(label) is used (Action works).
  py::object rows = fast_sequence(plan.ptr(), [] { return std::string("the plan"); });
  const Py_ssize_t ndev = PySequence_Fast_GET_SIZE(rows.ptr());
  std::vector<std::vector<runtime::ActionSpec>> spec(ndev);
  for (Py_ssize_t d = 0; d < ndev; ++d) {
    auto row_name = [d] { return "device " + std::to_string(d); };
    py::object row = fast_sequence(PySequence_Fast_GET_ITEM(rows.ptr(), d),
                                   [&] { return row_name() + "'s actions"; });
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(row.ptr());
    spec[d].resize(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      auto what = [&] { return row_name() + " action " + std::to_string(i); };
      PyObject* item = PySequence_Fast_GET_ITEM(row.ptr(), i);
      py::object pair;  // keeps label/deps alive when item is not a tuple
      PyObject *label = nullptr, *deps = nullptr;
      if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2) {
        label = PyTuple_GET_ITEM(item, 0);
        deps = PyTuple_GET_ITEM(item, 1);
      } else {
        pair = fast_sequence(item, what);
        if (PySequence_Fast_GET_SIZE(pair.ptr()) != 2) {
          throw std::invalid_argument("plan: " + what() + " must be (label, deps)");
        }
        label = PySequence_Fast_GET_ITEM(pair.ptr(), 0);
        deps = PySequence_Fast_GET_ITEM(pair.ptr(), 1);
      }
      Py_ssize_t len = 0;
      const char* utf8 = PyUnicode_Check(label) ? PyUnicode_AsUTF8AndSize(label, &len) : nullptr;
      if (utf8 == nullptr) {
        PyErr_Clear();
        spec[d][i].label = py::str(label);
      } else {
        spec[d][i].label.assign(utf8, len);
      }
      py::object dep_seq = fast_sequence(deps, [&] { return what() + "'s deps"; });
      const Py_ssize_t ndeps = PySequence_Fast_GET_SIZE(dep_seq.ptr());
      spec[d][i].deps.reserve(ndeps);
      for (Py_ssize_t k = 0; k < ndeps; ++k) {
        PyObject* dep = PySequence_Fast_GET_ITEM(dep_seq.ptr(), k);
        py::object dep_pair = fast_sequence(dep, [&] { return what() + ": a dependency"; });
        if (PySequence_Fast_GET_SIZE(dep_pair.ptr()) != 2) {
          throw std::invalid_argument("plan: " + what() + ": a dependency is (device, index)");
        }
        spec[d][i].deps.emplace_back(
            as_int(PySequence_Fast_GET_ITEM(dep_pair.ptr(), 0), [&] { return what() + ": a device"; }),
            as_int(PySequence_Fast_GET_ITEM(dep_pair.ptr(), 1), [&] { return what() + ": an index"; }));
      }
    }
  }
  return std::make_shared<const runtime::Plan>(runtime::Plan::build(num_devices, spec));
}

using RunKind = runtime::RunError::Kind;

// What PyExecutor.run returns: the run's outcome, by name. `kind` is RunKind.ok when the run
// completed; else the failure's kind, the action it concerns (device/index/label, -1/"" when
// none), for a timeout the dependency waited on, and for an action's failure or an
// interrupt the Python exception (`cause`). `timeline` is the run's timeline (see
// PyExecutor::timeline) unless the executor was closed or poisoned.
struct RunResult {
  RunKind kind = RunKind::kNone;
  int device = -1, index = -1, dep_device = -1, dep_index = -1;
  std::string label, message;
  py::object cause = py::none();
  py::object timeline = py::none();
};

// Seconds a close() waits for actions still running before it gives up on them.
constexpr double kDefaultCloseGraceS = 5.0;

// The flat graph table of `plan` from per-device rows of handles (graph_launch.h).
std::shared_ptr<const runtime::GraphTable> graph_table(const runtime::Plan& plan,
                                                       const std::vector<std::vector<Handle>>& rows) {
  if (static_cast<int>(rows.size()) != plan.num_devices()) {
    throw std::invalid_argument("graphs: one row per device expected");
  }
  auto table = std::make_shared<runtime::GraphTable>(plan.size(), 0);
  for (int d = 0; d < plan.num_devices(); ++d) {
    if (static_cast<int>(rows[d].size()) != plan.count(d)) {
      throw std::invalid_argument("graphs: device " + std::to_string(d) + " has " +
                                  std::to_string(plan.count(d)) + " actions, " +
                                  std::to_string(rows[d].size()) + " handles given");
    }
    std::copy(rows[d].begin(), rows[d].end(), table->begin() + plan.offset[d]);
  }
  return table;
}

class PyExecutor {
 public:
  PyExecutor(int num_devices, PyBackend backend, std::vector<Handle> streams,
             std::vector<int> device_ids, int spin, int yields, bool ranges)
      : backend_(std::move(backend)), host_(std::make_shared<PyHost>(num_devices)) {
    core_ = runtime::Executor::create(num_devices, *backend_.impl, host_, std::move(streams),
                                      {spin, yields, ranges, std::move(device_ids)});
  }
  ~PyExecutor() { close(kDefaultCloseGraceS); }

  // See runtime::Executor::shutdown; true unless called from the executor's own threads.
  // core_ is cleared first (with the GIL), so every later call sees a closed executor; a
  // run in progress keeps its own reference to the core until it returns.
  bool close(double grace_s) {
    if (!core_) return true;
    std::shared_ptr<runtime::Executor> core = std::move(core_);
    bool waited = true;
    {
      py::gil_scoped_release nogil;  // the workers take the GIL to drop their thread states
      waited = core->shutdown(grace_s);
    }
    poisoned_at_close_ = core->poisoned();
    return waited;  // `core` is released here, with the GIL (it may hold Python objects)
  }

  bool cancel(const std::string& reason, double grace_s) {
    std::shared_ptr<runtime::Executor> core = core_;
    if (!core) return false;
    py::gil_scoped_release nogil;
    return core->cancel({RunKind::kCancelled, -1, -1, -1, -1, reason}, grace_s);
  }

  RunResult run(py::object plan_or_list, py::object fn, double timeout_s, py::object graphs) {
    // A copy: close() from another thread clears core_ while this run still uses the core.
    std::shared_ptr<runtime::Executor> core = core_;
    if (!core) throw std::runtime_error("executor is closed");
    if (!(timeout_s > 0)) throw std::invalid_argument("timeout must be positive (inf: no timeout)");
    std::shared_ptr<const runtime::Plan> plan;
    if (py::isinstance<PlanHolder>(plan_or_list)) {
      plan = plan_or_list.cast<PlanHolder&>().plan;
    } else {
      plan = build_plan(core->num_devices(), plan_or_list);
    }
    // Captured graphs (runtime/graph_launch.h): per device, one handle per action (0: none).
    std::shared_ptr<const runtime::GraphTable> table;
    if (!graphs.is_none()) table = graph_table(*plan, graphs.cast<std::vector<std::vector<Handle>>>());
    auto action = std::make_shared<PyAction>();
    action->fn = std::move(fn);
    action->errors.resize(core->num_devices());
    std::shared_ptr<void> ctx(action.get(), [keep = action](void*) mutable {
      py::gil_scoped_acquire gil;  // dropping Python references needs the GIL
      keep.reset();
    });
    runtime::RunError err;
    {
      py::gil_scoped_release nogil;
      err = core->run(plan, &call_action, std::move(ctx), timeout_s, std::move(table));
    }
    RunResult result;
    result.kind = err.kind;
    result.device = err.device;
    result.index = err.index;
    result.dep_device = err.dep_device;
    result.dep_index = err.dep_index;
    result.message = std::move(err.message);
    if (err.kind == RunKind::kAction) result.cause = action->errors[err.device];
    if (err.kind == RunKind::kInterrupted) result.cause = host_->take_interrupt();
    if (err.device >= 0 && err.index >= 0) {
      result.label = plan->labels[plan->offset[err.device] + err.index];
    }
    // Read now, through our own reference: the workers are done (unless poisoned), and the
    // result must not depend on whether a close() has cleared core_ meanwhile.
    if (err.kind != RunKind::kClosed && !core->poisoned()) {
      last_timeline_ = read_timeline(*core);
      result.timeline = last_timeline_;
    }
    return result;
  }

  // Blocks (GIL released) until `event` completes: ok, timeout after `timeout_s`, or
  // cancelled as soon as the run in progress is (see Executor::cancel_flag).
  RunKind wait_event(Handle event, double timeout_s) {
    std::shared_ptr<runtime::Executor> core = core_;
    if (!core) throw std::runtime_error("executor is closed");
    py::gil_scoped_release nogil;
    if (runtime::host_wait(core->backend(), event, timeout_s, core->cancel_flag())) return RunKind::kNone;
    return core->cancel_flag()->load() ? RunKind::kCancelled : RunKind::kTimeout;
  }

  // The last run's timeline: (start_ns, end_ns, offsets, waits per device as int64 (n, 5)
  // arrays, wall_ns).
  py::object timeline() const {
    if (!core_) throw std::runtime_error("executor is closed");
    if (last_timeline_.is_none()) throw std::runtime_error("no run yet");
    return last_timeline_;
  }

  bool poisoned() const { return core_ ? core_->poisoned() : poisoned_at_close_; }
  bool closed() const { return !core_; }
  Handle stream(int d) const {
    if (!core_) throw std::runtime_error("executor is closed");
    if (d < 0 || d >= core_->num_devices()) throw py::index_error("device out of range");
    return core_->stream(d);
  }

  struct PlanHolder {
    std::shared_ptr<const runtime::Plan> plan;
  };

 private:
  static py::tuple read_timeline(const runtime::Executor& core) {
    const runtime::Plan& plan = *core.plan();
    py::array_t<std::int64_t> start(core.start_ns().size(), core.start_ns().data());
    py::array_t<std::int64_t> end(core.end_ns().size(), core.end_ns().data());
    py::list waits;
    for (int d = 0; d < core.num_devices(); ++d) {
      std::vector<runtime::WaitRecord> w = core.waits(d);
      py::array_t<std::int64_t> arr({static_cast<py::ssize_t>(w.size()), py::ssize_t{5}});
      auto a = arr.mutable_unchecked<2>();
      for (std::size_t k = 0; k < w.size(); ++k) {
        a(k, 0) = w[k].index;
        a(k, 1) = w[k].dep_device;
        a(k, 2) = w[k].dep_index;
        a(k, 3) = w[k].start_ns;
        a(k, 4) = w[k].end_ns;
      }
      waits.append(arr);
    }
    return py::make_tuple(start, end, plan.offset, waits, core.wall_ns());
  }

  std::shared_ptr<runtime::Executor> core_;
  PyBackend backend_;
  std::shared_ptr<PyHost> host_;
  py::object last_timeline_ = py::none();
  bool poisoned_at_close_ = false;
};

}  // namespace

void bind_runtime(py::module_& m) {
  using PlanHolder = PyExecutor::PlanHolder;

  py::class_<PyBackend>(m, "Backend", "A device backend: streams, events, record, wait, copy, "
                                      "host callback. Handles are integers.")
      .def_static("cpu", [] { return PyBackend{&runtime::cpu_backend(), py::none()}; },
                  "the CPU backend (host threads, CUDA's ordering semantics)")
      .def_static("from_capsule", &backend_from_capsule, py::arg("capsule"),
                  "wrap a backend exported by an extension (pipetrain._C_cuda.backend())")
      .def_property_readonly("name", [](const PyBackend& b) { return std::string(b.impl->name()); })
      .def_property_readonly("synchronous", [](const PyBackend& b) { return b.impl->synchronous(); })
      .def("device_count", [](const PyBackend& b) { return b.impl->device_count(); })
      .def("default_stream", [](PyBackend& b, int d) { return b.impl->default_stream(d); })
      .def("create_stream", [](PyBackend& b, int d) { return b.impl->create_stream(d); })
      .def("destroy_stream", [](PyBackend& b, Handle s) {
        py::gil_scoped_release nogil;  // a CPU stream joins its thread
        b.impl->destroy_stream(s);
      })
      .def("create_event", [](PyBackend& b, int d) { return b.impl->create_event(d); })
      .def("destroy_event", [](PyBackend& b, Handle e) { b.impl->destroy_event(e); })
      .def("record", [](PyBackend& b, Handle e, Handle s) { b.impl->record(e, s); },
           py::arg("event"), py::arg("stream"))
      .def("stream_wait", [](PyBackend& b, Handle s, Handle e) {
        py::gil_scoped_release nogil;  // on the CPU immediate stream this blocks the caller
        b.impl->stream_wait(s, e);
      }, py::arg("stream"), py::arg("event"))
      .def("query", [](PyBackend& b, Handle e) { return b.impl->query(e); })
      .def("copy", [](PyBackend& b, Handle s, std::uintptr_t dst, int dst_device,
                      std::uintptr_t src, int src_device, std::size_t nbytes) {
        py::gil_scoped_release nogil;
        b.impl->copy(s, reinterpret_cast<void*>(dst), dst_device,
                     reinterpret_cast<const void*>(src), src_device, nbytes);
      }, py::arg("stream"), py::arg("dst"), py::arg("dst_device"), py::arg("src"),
         py::arg("src_device"), py::arg("nbytes"))
      .def("host_callback", [](PyBackend& b, Handle s, py::function fn) {
        b.impl->host_callback(s, &run_py_callback, new py::object(std::move(fn)));
      }, py::arg("stream"), py::arg("fn"))
      .def("synchronize", [](PyBackend& b, Handle s, double timeout_s) {
        py::gil_scoped_release nogil;
        return b.impl->synchronize(s, timeout_s);
      }, py::arg("stream"), py::arg("timeout"))
      .def("wait_event", [](PyBackend& b, Handle e, double timeout_s) {
        py::gil_scoped_release nogil;
        return runtime::host_wait(*b.impl, e, timeout_s);
      }, py::arg("event"), py::arg("timeout"), "block the caller until the event completes")
      .def("range_push", [](PyBackend& b, const std::string& name) { b.impl->range_push(name.c_str()); })
      .def("range_pop", [](PyBackend& b) { b.impl->range_pop(); })
      .def("profiler_start", [](PyBackend& b) { b.impl->profiler_start(); })
      .def("profiler_stop", [](PyBackend& b) { b.impl->profiler_stop(); });

  py::class_<PlanHolder>(m, "Plan", "A validated plan, reusable across runs.")
      .def(py::init([](int num_devices, py::object plan) {
             return PlanHolder{build_plan(num_devices, plan)};
           }), py::arg("num_devices"), py::arg("plan"))
      .def_property_readonly("num_devices", [](const PlanHolder& p) { return p.plan->num_devices(); })
      .def("__len__", [](const PlanHolder& p) { return p.plan->size(); })
      .def("count", [](const PlanHolder& p, int d) { return p.plan->count(d); })
      .def("labels", [](const PlanHolder& p, int d) {
        return std::vector<std::string>(p.plan->labels.begin() + p.plan->offset[d],
                                        p.plan->labels.begin() + p.plan->offset[d + 1]);
      });

  py::enum_<RunKind>(m, "RunKind", "How a run ended; the name is ExecutorError.kind.")
      .value("ok", RunKind::kNone)
      .value("action", RunKind::kAction)
      .value("backend", RunKind::kBackend)
      .value("timeout", RunKind::kTimeout)
      .value("interrupted", RunKind::kInterrupted)
      .value("stuck", RunKind::kStuck)
      .value("closed", RunKind::kClosed)
      .value("cancelled", RunKind::kCancelled);

  py::class_<RunResult>(m, "RunResult", "The outcome of Executor.run (see bind_runtime.cpp).")
      .def_readonly("kind", &RunResult::kind)
      .def_readonly("device", &RunResult::device)
      .def_readonly("index", &RunResult::index)
      .def_readonly("dep_device", &RunResult::dep_device)
      .def_readonly("dep_index", &RunResult::dep_index)
      .def_readonly("label", &RunResult::label)
      .def_readonly("message", &RunResult::message)
      .def_readonly("cause", &RunResult::cause)
      .def_readonly("timeline", &RunResult::timeline)
      .def_property_readonly("ok", [](const RunResult& r) { return r.kind == RunKind::kNone; })
      .def("__repr__", [](const RunResult& r) {
        return "RunResult(kind=" + std::string(py::str(py::cast(r.kind).attr("name"))) +
               ", device=" + std::to_string(r.device) + ", index=" + std::to_string(r.index) +
               ", message=" + std::string(py::repr(py::str(r.message))) + ")";
      });

  py::class_<PyExecutor>(m, "Executor", "One issuing thread per device; see engine/executor.py.")
      .def(py::init<int, PyBackend, std::vector<Handle>, std::vector<int>, int, int, bool>(),
           py::arg("num_devices"), py::arg("backend"), py::arg("streams"),
           py::arg("device_ids"), py::arg("spin"), py::arg("yields"), py::arg("ranges"))
      .def("run", &PyExecutor::run, py::arg("plan"), py::arg("run_action"), py::arg("timeout"),
           py::arg("graphs") = py::none())
      .def("timeline", &PyExecutor::timeline)
      .def("close", &PyExecutor::close, py::arg("grace") = kDefaultCloseGraceS)
      .def("cancel", &PyExecutor::cancel, py::arg("reason"), py::arg("grace"))
      .def("stream", &PyExecutor::stream)
      .def("wait_event", &PyExecutor::wait_event, py::arg("event"), py::arg("timeout"))
      .def_property_readonly("poisoned", &PyExecutor::poisoned)
      .def_property_readonly("closed", &PyExecutor::closed);

  bind_graphs(m);
  m.def("range_name", &runtime::range_name, py::arg("label"), "NVTX range name: '1F3' -> 's1/F3'");
}

}  // namespace pipetrain

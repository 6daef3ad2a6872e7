// Captured graphs the executor launches itself, without calling into the host language.
//
// engine/cuda_graphs.py captures a stage's F/B/I/W as CUDA graphs; once every action of a
// run has one, Python hands the executor a table with one graph handle per action (0: run
// the callback as usual). The issuing thread then leaves the host context (the GIL) and calls
// Backend::launch_graph on the device's stream for each such action; dependencies, events
// and the timeline are as for any action.
//
// On CPU a handle is a HostGraph: a plain function and its argument, run inline. Nothing in
// the engine makes them (the fake graph backend of the Python tests replays through the
// callback); they let the tests drive the executor's launch path on machines without a GPU.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "runtime/backend.h"

namespace pipetrain::runtime {

struct HostGraph {
  void (*fn)(void*);
  void* arg;
};

// Runs the HostGraph a handle points to (a null handle or function is a logic error).
void run_host_graph(Handle graph);

// Per global action id (Plan order), the graph to launch instead of the callback; 0 = none.
using GraphTable = std::vector<Handle>;

}  // namespace pipetrain::runtime

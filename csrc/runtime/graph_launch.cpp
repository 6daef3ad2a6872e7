// Backend::launch_graph's default (a backend without graphs) and the CPU HostGraph runner.
#include "runtime/graph_launch.h"

#include <stdexcept>
#include <string>

namespace pipetrain::runtime {

void Backend::launch_graph(Handle, Handle) {
  throw std::logic_error(std::string("the ") + name() + " backend cannot launch captured graphs");
}

void run_host_graph(Handle graph) {
  auto* g = reinterpret_cast<HostGraph*>(graph);
  if (g == nullptr || g->fn == nullptr) throw std::logic_error("launch_graph: null host graph");
  g->fn(g->arg);
}

}  // namespace pipetrain::runtime

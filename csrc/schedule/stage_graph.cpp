// Stage graph construction: CSR adjacency both ways, chunk numbering, acyclicity check.
#include "schedule/stage_graph.h"

#include <algorithm>
#include <functional>
#include <queue>
#include <stdexcept>
#include <string>

namespace pipetrain::schedule {

StageGraph::StageGraph(int num_stages, int num_devices, std::vector<std::pair<int, int>> edges,
                       std::vector<int> device_of)
    : num_stages_(num_stages), num_devices_(num_devices), edges_(std::move(edges)),
      device_of_(std::move(device_of)) {
  if (num_stages < 1) {
    throw std::invalid_argument("num_stages must be >= 1, got " + std::to_string(num_stages));
  }
  if (num_devices < 1) {
    throw std::invalid_argument("num_devices must be >= 1, got " + std::to_string(num_devices));
  }
  if (static_cast<int>(device_of_.size()) != num_stages) {
    throw std::invalid_argument("placement must give one device per stage (" +
                                std::to_string(num_stages) + "), got " +
                                std::to_string(device_of_.size()));
  }
  for (int s = 0; s < num_stages; ++s) {
    if (device_of_[s] < 0 || device_of_[s] >= num_devices) {
      throw std::invalid_argument("stage " + std::to_string(s) + " placed on device " +
                                  std::to_string(device_of_[s]) + "; devices are 0.." +
                                  std::to_string(num_devices - 1));
    }
  }
  // Chunks: rank of the stage among its device's stages, by stage id.
  chunk_of_.assign(num_stages, 0);
  std::vector<int> seen(num_devices, 0);
  for (int s = 0; s < num_stages; ++s) chunk_of_[s] = seen[device_of_[s]]++;

  // Successor CSR, edges sorted by (from, to) so edge ids are deterministic.
  std::sort(edges_.begin(), edges_.end());
  for (size_t i = 0; i < edges_.size(); ++i) {
    auto [a, b] = edges_[i];
    if (a < 0 || a >= num_stages || b < 0 || b >= num_stages) {
      throw std::invalid_argument("edge (" + std::to_string(a) + ", " + std::to_string(b) +
                                  ") names a stage outside 0.." + std::to_string(num_stages - 1));
    }
    if (a == b) throw std::invalid_argument("self edge on stage " + std::to_string(a));
    if (i > 0 && edges_[i - 1] == edges_[i]) {
      throw std::invalid_argument("duplicate edge (" + std::to_string(a) + ", " +
                                  std::to_string(b) + ")");
    }
    if (b != a + 1) is_chain_ = false;
  }
  if (static_cast<int>(edges_.size()) != num_stages - 1) is_chain_ = false;
  succ_start_.assign(num_stages + 1, 0);
  pred_start_.assign(num_stages + 1, 0);
  for (auto [a, b] : edges_) {
    ++succ_start_[a + 1];
    ++pred_start_[b + 1];
  }
  for (int s = 0; s < num_stages; ++s) {
    succ_start_[s + 1] += succ_start_[s];
    pred_start_[s + 1] += pred_start_[s];
  }
  succ_.resize(edges_.size());
  pred_.resize(edges_.size());
  pred_edge_.resize(edges_.size());
  std::vector<int> fill(pred_start_.begin(), pred_start_.end() - 1);
  for (size_t e = 0; e < edges_.size(); ++e) {
    auto [a, b] = edges_[e];
    succ_[e] = b;  // edges_ sorted by from, so position e is inside a's successor range
    pred_[fill[b]] = a;
    pred_edge_[fill[b]++] = static_cast<int>(e);
  }
  // Kahn's algorithm, smallest ready id first: a schedule over a cyclic stage graph could
  // never finish, and the order is the one topological_order() promises.
  std::vector<int> indeg(num_stages, 0);
  std::priority_queue<int, std::vector<int>, std::greater<int>> ready;
  for (auto [a, b] : edges_) ++indeg[b];
  for (int s = 0; s < num_stages; ++s)
    if (indeg[s] == 0) ready.push(s);
  topo_.reserve(num_stages);
  while (!ready.empty()) {
    int s = ready.top();
    ready.pop();
    topo_.push_back(s);
    for (int e = succ_begin(s); e < succ_end(s); ++e)
      if (--indeg[succ_[e]] == 0) ready.push(succ_[e]);
  }
  if (static_cast<int>(topo_.size()) != num_stages)
    throw std::invalid_argument("the stage graph has a cycle");
}

StageGraph StageGraph::chain(int num_stages) {
  if (num_stages < 1) {
    throw std::invalid_argument("num_stages must be >= 1, got " + std::to_string(num_stages));
  }
  std::vector<std::pair<int, int>> edges;
  std::vector<int> dev(num_stages);
  for (int s = 0; s < num_stages; ++s) {
    dev[s] = s;
    if (s + 1 < num_stages) edges.emplace_back(s, s + 1);
  }
  return StageGraph(num_stages, num_stages, std::move(edges), std::move(dev));
}

StageGraph StageGraph::interleaved(int num_devices, int num_chunks) {
  if (num_devices < 1 || num_chunks < 1) {
    throw std::invalid_argument("num_stages and num_chunks must be >= 1, got " +
                                std::to_string(num_devices) + " and " +
                                std::to_string(num_chunks));
  }
  int n = num_devices * num_chunks;
  std::vector<std::pair<int, int>> edges;
  std::vector<int> dev(n);
  for (int k = 0; k < n; ++k) {
    dev[k] = k % num_devices;
    if (k + 1 < n) edges.emplace_back(k, k + 1);
  }
  return StageGraph(n, num_devices, std::move(edges), std::move(dev));
}

std::vector<int> StageGraph::successors(int s) const {
  return std::vector<int>(succ_.begin() + succ_start_[s], succ_.begin() + succ_start_[s + 1]);
}

std::vector<int> StageGraph::predecessors(int s) const {
  return std::vector<int>(pred_.begin() + pred_start_[s], pred_.begin() + pred_start_[s + 1]);
}

std::vector<int> StageGraph::sources() const {
  std::vector<int> out;
  for (int s = 0; s < num_stages_; ++s)
    if (pred_start_[s] == pred_start_[s + 1]) out.push_back(s);
  return out;
}

std::vector<int> StageGraph::sinks() const {
  std::vector<int> out;
  for (int s = 0; s < num_stages_; ++s)
    if (succ_start_[s] == succ_start_[s + 1]) out.push_back(s);
  return out;
}

int StageGraph::edge_id(int from, int to) const {
  if (from < 0 || from >= num_stages_) return -1;
  for (int e = succ_start_[from]; e < succ_start_[from + 1]; ++e)
    if (succ_[e] == to) return e;
  return -1;
}

}  // namespace pipetrain::schedule

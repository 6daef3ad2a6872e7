// The stage graph: stages addressed by id, explicit edges, and a placement stage -> device.
//
// Dependencies are derived from the edges, never from "s - 1 / s + 1", so a DAG of stages
// (GraphPipe) uses the same IR as a chain. Edges are stored twice in CSR form (successors
// and predecessors); each edge has an id (its position in the successor CSR) that
// transfer bookkeeping uses.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace pipetrain::schedule {

class StageGraph {
 public:
  StageGraph() = default;
  // edges: (from, to) pairs; device_of[s]: the device holding stage s. The chunk of a stage
  // is its rank among the stages of its device, in increasing stage id. Throws
  // std::invalid_argument on out-of-range ids, self edges, duplicate edges or cycles.
  StageGraph(int num_stages, int num_devices, std::vector<std::pair<int, int>> edges,
             std::vector<int> device_of);

  // p stages in a chain 0 -> 1 -> ... -> p-1, stage s on device s.
  static StageGraph chain(int num_stages);
  // p*v stages in a chain, stage k on device k % p, chunk k / p (Megatron interleaving).
  static StageGraph interleaved(int num_devices, int num_chunks);

  int num_stages() const { return num_stages_; }
  int num_devices() const { return num_devices_; }
  int num_edges() const { return static_cast<int>(succ_.size()); }
  int device_of(int s) const { return device_of_[s]; }
  int chunk_of(int s) const { return chunk_of_[s]; }
  const std::vector<int>& devices() const { return device_of_; }
  const std::vector<std::pair<int, int>>& edge_list() const { return edges_; }

  // Successors of s are succ_[succ_start_[s] .. succ_start_[s+1]); edge id = that position.
  int succ_begin(int s) const { return succ_start_[s]; }
  int succ_end(int s) const { return succ_start_[s + 1]; }
  int succ_at(int e) const { return succ_[e]; }
  // Predecessors of s, with the id of the edge (pred -> s) beside each.
  int pred_begin(int s) const { return pred_start_[s]; }
  int pred_end(int s) const { return pred_start_[s + 1]; }
  int pred_at(int i) const { return pred_[i]; }
  int pred_edge_at(int i) const { return pred_edge_[i]; }
  std::vector<int> successors(int s) const;
  std::vector<int> predecessors(int s) const;
  // Edge id of (from -> to), or -1.
  int edge_id(int from, int to) const;
  bool is_chain() const { return is_chain_; }
  // Stage ids with no predecessors / no successors, increasing.
  std::vector<int> sources() const;
  std::vector<int> sinks() const;
  // Every stage after all its predecessors; among the ready stages the smallest id first, so
  // a chain gives 0, 1, ..., S-1.
  const std::vector<int>& topological_order() const { return topo_; }

 private:
  int num_stages_ = 0;
  int num_devices_ = 0;
  bool is_chain_ = true;
  std::vector<std::pair<int, int>> edges_;
  std::vector<int> device_of_, chunk_of_;
  std::vector<int> succ_start_, succ_;
  std::vector<int> pred_start_, pred_, pred_edge_;
  std::vector<int> topo_;
};

}  // namespace pipetrain::schedule

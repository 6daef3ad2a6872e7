// Slot tables: for each of a few kinds, one gid slot (-1 = absent) per key 0..keys-1.
//
// The validator indexes actions by (stage, micro-batch) or (edge, micro-batch). A flat array
// is fastest, but its size is what the schedule *claims* (stages x micro-batches), which a
// bad header or a stray "0F99999999" can make enormous. So the table is flat only while
// its size is within a constant factor of the actions that fill it; beyond that it is a
// hash map, and the schedule is then necessarily incomplete (fewer actions than slots to
// fill), which the completeness pass reports after visiting at most as many keys as there
// are actions. Either way memory and time follow the actions given.
#pragma once
#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <vector>

namespace pipetrain::schedule {

class SlotTable {
 public:
  // `kinds` tables of `keys` slots each, to be filled with `entries` actions in all.
  void init(int kinds, std::int64_t keys, std::int64_t entries) {
    keys_ = keys;
    dense_ = keys <= std::max<std::int64_t>(entries, kSmall);
    flat_.assign(kinds, {});
    sparse_.assign(kinds, {});
    for (int k = 0; k < kinds; ++k) {
      if (dense_) flat_[k].assign(static_cast<size_t>(keys), -1);
      else sparse_[k].reserve(static_cast<size_t>(entries));
    }
  }
  bool dense() const { return dense_; }
  std::int64_t keys() const { return keys_; }
  // The gid in slot (kind, key), or -1.
  int get(int kind, std::int64_t key) const {
    if (dense_) return flat_[kind][static_cast<size_t>(key)];
    auto it = sparse_[kind].find(key);
    return it == sparse_[kind].end() ? -1 : it->second;
  }
  // The slot itself (created empty, -1, if absent), to fill.
  int& at(int kind, std::int64_t key) {
    if (dense_) return flat_[kind][static_cast<size_t>(key)];
    return sparse_[kind].try_emplace(key, -1).first->second;
  }

 private:
  static constexpr std::int64_t kSmall = 4096;  // below this, flat regardless
  std::int64_t keys_ = 0;
  bool dense_ = true;
  std::vector<std::vector<int>> flat_;
  std::vector<std::unordered_map<std::int64_t, int>> sparse_;
};

}  // namespace pipetrain::schedule

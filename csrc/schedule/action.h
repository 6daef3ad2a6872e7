// One action of a pipeline schedule: a stage, a micro-batch and a kind, printed "1F3".
//
// Pass kinds work on one (stage, micro-batch): F (forward), B (full backward), I
// (input-gradient backward) and W (weight-gradient backward) -- I and W are the zero-bubble
// split of B. A pass may name the weight version it runs on: "1F3@2" is stage 1's forward
// of micro-batch 3 on version 2; without "@" the version is -1, "the live weights".
// U is the optimizer update of one stage after one mini-batch: "1U0" updates stage 1 after
// mini-batch 0 (its index field holds the mini-batch t, not a micro-batch) and produces
// version t + 1 of that stage's weights.
// Transfer kinds appear after lowering (lower.h): SF/RF send/receive a forward activation,
// SB/RB send/receive an activation gradient. A transfer names its own stage and the peer:
//   "1SF3>2"  stage 1 sends micro-batch 3's activation to stage 2
//   "2RF3<1"  stage 2 receives it from stage 1
//   "2SB3>1"  stage 2 sends micro-batch 3's input gradient back to stage 1
//   "1RB3<2"  stage 1 receives it from stage 2
// Transfers and U carry no version.
// A W may cover a contiguous range of micro-batches (a *batched* W): "1W3-5" is stage 1's
// weight-gradient backward of micro-batches 3, 4 and 5 run as one computation (for a
// Linear, one GEMM over the concatenated saved inputs and output gradients); "1W3-5@2" on
// version 2. `count` is the number of micro-batches covered (1 for every other action);
// "1W3-3" is "1W3". The range is contiguous because the generators only batch runs of
// consecutive W's (the cool-down) and a range keeps Action a fixed-size value.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace pipetrain::schedule {

enum class Kind : std::uint8_t { F, B, I, W, U, SF, RF, SB, RB };
inline constexpr int kNumKinds = 9;
inline constexpr Kind kAllKinds[kNumKinds] = {Kind::F,  Kind::B,  Kind::I,  Kind::W, Kind::U,
                                              Kind::SF, Kind::RF, Kind::SB, Kind::RB};
// Per-kind tables: the passes F, B, I, W and the transfers SF, RF, SB, RB each have a slot.
inline constexpr int kNumPassKinds = 4;
inline constexpr int kNumTransferKinds = 4;
// Versions: kLiveWeights = unversioned.
inline constexpr std::int32_t kLiveWeights = -1;

inline constexpr bool is_pass(Kind k) {
  return k == Kind::F || k == Kind::B || k == Kind::I || k == Kind::W;
}
inline constexpr bool is_update(Kind k) { return k == Kind::U; }
// Takes device time: a pass or an update (transfers run on copy engines).
inline constexpr bool is_compute(Kind k) { return is_pass(k) || is_update(k); }
inline constexpr bool is_transfer(Kind k) { return !is_compute(k); }
inline constexpr bool is_send(Kind k) { return k == Kind::SF || k == Kind::SB; }
inline constexpr bool is_recv(Kind k) { return k == Kind::RF || k == Kind::RB; }
// B and I produce the input gradient a predecessor stage waits for.
inline constexpr bool is_input_grad(Kind k) { return k == Kind::B || k == Kind::I; }
// B and W finish a micro-batch's weight gradient: what an update U waits for.
inline constexpr bool is_weight_grad(Kind k) { return k == Kind::B || k == Kind::W; }
// Only passes name a weight version.
inline constexpr bool takes_version(Kind k) { return is_pass(k); }

// Index of a pass kind in F, B, I, W order / of a transfer kind in SF, RF, SB, RB order.
inline constexpr int pass_slot(Kind k) {
  return k == Kind::F ? 0 : k == Kind::B ? 1 : k == Kind::I ? 2 : 3;
}
inline constexpr int transfer_slot(Kind k) {
  return k == Kind::SF ? 0 : k == Kind::RF ? 1 : k == Kind::SB ? 2 : 3;
}

// "F", "B", "I", "W", "U", "SF", "RF", "SB", "RB".
const char* kind_name(Kind k);
// Inverse of kind_name; returns false for anything else.
bool kind_from_name(std::string_view name, Kind* out);

struct Action {
  std::int32_t stage = 0;       // global (virtual) stage id
  std::int32_t microbatch = 0;  // 0-based, global over mini-batches; U: the mini-batch index
  std::int32_t peer = -1;       // transfers only: the stage on the other end
  std::int32_t version = kLiveWeights;  // passes only: the weight version, or live weights
  std::int32_t count = 1;  // W only: micro-batches microbatch .. microbatch + count - 1
  Kind kind = Kind::F;

  // The last micro-batch covered (== microbatch unless a batched W).
  std::int64_t last_microbatch() const { return static_cast<std::int64_t>(microbatch) + count - 1; }

  bool operator==(const Action& o) const {
    return stage == o.stage && microbatch == o.microbatch && peer == o.peer &&
           version == o.version && count == o.count && kind == o.kind;
  }
};

// A pass (F, B, I or W) of stage `stage`, micro-batch `mb`, on weight version `version`.
inline Action pass_action(int stage, int mb, Kind k, int version = kLiveWeights) {
  Action a;
  a.stage = stage;
  a.microbatch = mb;
  a.kind = k;
  a.version = version;
  return a;
}

// The update of stage `stage` after mini-batch `t`.
inline Action update_action(int stage, int t) {
  Action a;
  a.stage = stage;
  a.microbatch = t;
  a.kind = Kind::U;
  return a;
}

// "1F3", "1F3@2", "1W3-5", "1U0", or "1SF3>2" / "2RF3<1" for transfers.
std::string to_string(const Action& a);

// Parses the text form (surrounding blanks allowed). Throws std::invalid_argument naming
// what is wrong: an unknown form, a peer on a non-transfer, a version on a non-pass, or a
// number >= 2**31 (naming the field), a range on anything but W or a range whose end is
// below its start.
Action parse_action(std::string_view text);

}  // namespace pipetrain::schedule

// One action of a pipeline schedule: a stage, a micro-batch and a kind, printed "1F3".
//
// Compute kinds: F (forward), B (full backward), I (input-gradient backward) and W
// (weight-gradient backward) -- I and W are the zero-bubble split of B. Transfer kinds
// appear after lowering (lower.h): SF/RF send/receive a forward activation, SB/RB send/
// receive an activation gradient. A transfer names its own stage and the peer stage:
//   "1SF3>2"  stage 1 sends micro-batch 3's activation to stage 2
//   "2RF3<1"  stage 2 receives it from stage 1
//   "2SB3>1"  stage 2 sends micro-batch 3's input gradient back to stage 1
//   "1RB3<2"  stage 1 receives it from stage 2
#pragma once
#include <cstdint>
#include <string>

namespace pipetrain::schedule {

enum class Kind : std::uint8_t { F = 0, B = 1, I = 2, W = 3, SF = 4, RF = 5, SB = 6, RB = 7 };
constexpr int kNumKinds = 8;

inline bool is_compute(Kind k) { return static_cast<int>(k) < 4; }
inline bool is_transfer(Kind k) { return !is_compute(k); }
inline bool is_send(Kind k) { return k == Kind::SF || k == Kind::SB; }
inline bool is_recv(Kind k) { return k == Kind::RF || k == Kind::RB; }
// B and I produce the input gradient a predecessor stage waits for.
inline bool is_input_grad(Kind k) { return k == Kind::B || k == Kind::I; }

// "F", "B", "I", "W", "SF", "RF", "SB", "RB".
const char* kind_name(Kind k);
// Inverse of kind_name; returns false for anything else.
bool kind_from_name(const std::string& name, Kind* out);

struct Action {
  std::int32_t stage = 0;       // global (virtual) stage id
  std::int32_t microbatch = 0;  // 0-based
  std::int32_t peer = -1;       // transfers only: the stage on the other end
  Kind kind = Kind::F;

  bool operator==(const Action& o) const {
    return stage == o.stage && microbatch == o.microbatch && peer == o.peer && kind == o.kind;
  }
};

// A compute action (F, B, I or W): stage `stage`, micro-batch `mb`.
inline Action compute_action(int stage, int mb, Kind k) {
  Action a;
  a.stage = stage;
  a.microbatch = mb;
  a.kind = k;
  return a;
}

// "1F3", or "1SF3>2" / "2RF3<1" for transfers.
std::string to_string(const Action& a);

}  // namespace pipetrain::schedule

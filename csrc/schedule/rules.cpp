// Names of the schedule rules.
#include "schedule/rules.h"

namespace pipetrain::schedule {

const char* rule_name(Rule r) {
  switch (r) {
    case Rule::kOk: return "ok";
    case Rule::kStageRange: return "stage-range";
    case Rule::kMicrobatchRange: return "microbatch-range";
    case Rule::kUpdateRange: return "update-range";
    case Rule::kVersionRange: return "version-range";
    case Rule::kVersionMismatch: return "version-mismatch";
    case Rule::kMissingUpdate: return "missing-update";
    case Rule::kUpdateAfterGradient: return "update-after-gradient";
    case Rule::kUpdateOrder: return "update-order";
    case Rule::kVersionAfterUpdate: return "version-after-update";
    case Rule::kWrongDevice: return "wrong-device";
    case Rule::kNotAnEdge: return "not-an-edge";
    case Rule::kLocalTransfer: return "local-transfer";
    case Rule::kDuplicate: return "duplicate";
    case Rule::kMissingForward: return "missing-forward";
    case Rule::kMissingBackward: return "missing-backward";
    case Rule::kMissingWeight: return "missing-weight";
    case Rule::kMixedBackward: return "mixed-backward";
    case Rule::kMissingTransfer: return "missing-transfer";
    case Rule::kUnmatchedSend: return "unmatched-send";
    case Rule::kUnmatchedRecv: return "unmatched-recv";
    case Rule::kForwardAfterPredecessor: return "forward-after-predecessor";
    case Rule::kForwardAfterRecv: return "forward-after-recv";
    case Rule::kBackwardAfterForward: return "backward-after-forward";
    case Rule::kBackwardAfterSuccessor: return "backward-after-successor";
    case Rule::kBackwardAfterRecv: return "backward-after-recv";
    case Rule::kWeightAfterInputGrad: return "weight-after-input-grad";
    case Rule::kSendAfterCompute: return "send-after-compute";
    case Rule::kRecvAfterSend: return "recv-after-send";
    case Rule::kDeadlock: return "deadlock";
  }
  return "unknown";
}

}  // namespace pipetrain::schedule

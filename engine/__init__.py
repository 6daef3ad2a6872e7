"""pipetrain: pipeline-parallel training for PyTorch, every schedule from one IR.

Modules: ``schedules`` (the schedule IR: build, parse, validate, simulate), ``Pipeline``
(train an ``nn.Sequential`` through any synchronous schedule), ``executor`` (the C++
executor), ``optim`` (fused SGD/Adam/AdamW with weight prediction), ``flat_buffer`` (one
contiguous buffer per stage), ``kernels`` (Triton kernels and their torch references),
``plan`` (choose depth, width, micro-batch size, schedule and recompute under a memory
limit), ``graphpipe`` (GraphPipe's DAG partitioner).
"""

from pipetrain import _C  # noqa: F401  (the compiled core; fails loudly if the build is missing)

__version__ = "0.1.0"

# After _C, so a missing build fails with the clearest error first.
from pipetrain import flat_buffer, optim, schedules  # noqa: E402
from pipetrain.pipeline import Pipeline, PipelineError  # noqa: E402
from pipetrain.schedules import ScheduleError  # noqa: E402
from pipetrain.checkpointing import load_checkpoint, save_checkpoint  # noqa: E402
from pipetrain.loss_scaling import LossScaler  # noqa: E402

from pipetrain.planner import plan  # noqa: E402

__all__ = ["LossScaler", "Pipeline", "PipelineError", "ScheduleError", "flat_buffer", "load_checkpoint",
           "optim", "plan", "save_checkpoint", "schedules", "__version__"]

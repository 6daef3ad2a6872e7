"""pipetrain: pipeline-parallel training for PyTorch, every schedule from one IR."""

from pipetrain import _C  # noqa: F401  (the compiled core; fails loudly if the build is missing)

__version__ = "0.1.0"

from pipetrain.pipeline import Pipeline, PipelineError  # noqa: E402  (after _C: fails loudly first)

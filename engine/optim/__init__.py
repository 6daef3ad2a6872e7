"""pipetrain.optim: fused SGD, Adam and AdamW (torch.optim-compatible) with weight prediction.

Drop-in ``torch.optim.Optimizer`` subclasses — same param groups, ``zero_grad``,
``state_dict()`` format — whose update is one fused kernel per flat parameter bucket
(``pipetrain.flat_buffer``) or per parameter: the C++ kernels on CPU, Triton on CUDA.
They add ``predict(s, out=None)`` (SpecTrain / XPipe weight prediction) and
``step_and_predict(s, out=None)`` (update then predict in one pass), ``found_inf`` /
``skip_nonfinite`` step skipping, and ``master_weights=True`` for bf16/fp16 parameters.
"""

from pipetrain._cpu_kernels import get_num_threads, set_num_threads

from .adam import Adam, AdamW
from .base import FusedOptimizer
from .sgd import SGD

# set_num_threads / get_num_threads: the CPU kernels' thread pool (also PIPETRAIN_NUM_THREADS).
__all__ = ["SGD", "Adam", "AdamW", "FusedOptimizer", "set_num_threads", "get_num_threads"]

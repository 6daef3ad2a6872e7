"""What a Pipeline offers beyond step(): its rank, global gradient clipping, checkpoints,
evaluation (a mixin of :class:`~pipetrain.pipeline.Pipeline`).

Each method works in one process and across processes (``self.dist``, :mod:`pipetrain.distributed`).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["GlobalOps"]


class GlobalOps:
    """Mixin: needs ``self.dist``, ``self.parameters()`` (see :class:`~pipetrain.pipeline.Pipeline`)."""

    @property
    def pp_rank(self) -> int:
        """This process's pipeline device (0 in one process)."""
        return self.dist.mesh.pp_rank if self.dist is not None else 0

    @property
    def dp_rank(self) -> int:
        """This process's data-parallel replica (0 in one process)."""
        return self.dist.mesh.dp_rank if self.dist is not None else 0

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Scale every stage's gradients (on every rank) so that their total norm is at most
        ``max_norm``, as ``torch.nn.utils.clip_grad_norm_`` on the unsplit model (a tied
        weight counted once); returns the total norm before clipping, on every rank."""
        if self.dist is not None:
            return self.dist.clip_grad_norm_(self, max_norm, norm_type)
        unique = list({id(p): p for p in self.parameters()}.values())
        return torch.nn.utils.clip_grad_norm_(unique, max_norm, norm_type)

    @property
    def loss_scale(self) -> float:
        """The loss scale the next step uses (1.0 without ``loss_scale=``)."""
        return self.scaler.scale if getattr(self, "scaler", None) is not None else 1.0

    def optimizer_step(self, optimizer: Any = None) -> bool:
        """``optimizer.step()`` (default: each local stage's ``optimizer=``) unless a step
        since the last call found an inf/NaN gradient on any stage or rank (then nothing was
        committed and every rank skips alike); returns whether it stepped. Call it where
        you would call ``opt.step()`` (:mod:`pipetrain.loss_scaling`). Gradients are checked
        with ``loss_scale=`` and, across processes, always; in one process without a scaler
        nothing is checked and it always steps."""
        from pipetrain import loss_scaling
        return loss_scaling.optimizer_step(self, optimizer)

    def state_dict(self, optimizer: Any = None) -> dict:
        """This process's stages' tensors (and ``optimizer``'s state for them), keyed as in
        the unsplit model (:mod:`pipetrain.checkpointing`)."""
        from pipetrain import checkpointing
        return checkpointing.state_dict(self, optimizer)

    def load_state_dict(self, state: dict, optimizer: Any = None, strict: bool = True) -> None:
        """Load :meth:`state_dict` output (from any split) into this process's stages."""
        from pipetrain import checkpointing
        checkpointing.load_state_dict(self, state, optimizer, strict)

    def eval(self, inputs: Any, targets: Any = None) -> Any:
        """Forward-only pipelined run (no autograd, modules in eval mode meanwhile): the merged
        last-stage outputs (``None`` on ranks without the last stage), and with ``targets``
        ``(outputs, loss)``, the loss as ``step`` computes it (on every rank). The batch size
        may differ from training's (at least ``num_microbatches``)."""
        from pipetrain import evaluation
        out, loss = self.dist.eval(self, inputs, targets) if self.dist is not None \
            else evaluation.evaluate(self, inputs, targets)
        return out if targets is None else (out, loss)

"""The non-finite verdict of a step: local checks, the ranks' agreement, and the skip counters.

A step with a non-finite gradient anywhere is skipped whole, on every rank alike. On CPU the verdict is a
host bool agreed with one 1-element all-reduce; on a GPU it stays a device tensor (see
``MatrixOptimizer._step_verdict_on_device``) and the counters read it only when asked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from ..integrations.dtensor import is_dtensor, local_tensor
from ..sinkhorn import all_reduce_sum

log = logging.getLogger("sinkgd_ds")

__all__ = ["SkipVerdict"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local block (checks on it need no collective); any other tensor as it is."""
    return local_tensor(t) if is_dtensor(t) else t


class SkipVerdict:
    """Mixin of MatrixOptimizer (its attributes: ``_where``, ``_consensus_group``, ``_has_dtensors``,
    ``_verdict``, ``_pending_skips``, ``_skipped_steps``, ``_last_step_skipped``)."""

    def _nonfinite_flag(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """A 0-dim fp32 tensor on the tensors' device, nonzero when any of them holds inf or NaN (no host read);
        None when there is nothing to check."""
        if not tensors:
            return None
        norms = torch._foreach_norm([_local(t) for t in tensors], float("inf"))  # (max |x|: inf or NaN exactly
        # when non-finite; on local blocks: a DTensor's norm would be a collective)
        return (~torch.isfinite(torch.stack([n.float() for n in norms]))).any().float()

    @staticmethod
    def _finite_flags(tensors: Sequence[torch.Tensor]) -> list[bool]:
        """Whether each tensor is all finite (one host sync for all of them)."""
        return torch.stack([torch.isfinite(_local(t)).all() for t in tensors]).tolist() if tensors else []

    def _local_nonfinite(self, tensors: Iterable[torch.Tensor]) -> bool:
        return not all(self._finite_flags([t for t in tensors if t is not None]))

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (on a GPU counted on the device, read here)."""
        self._resolve_verdicts()
        return self._skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._resolve_verdicts()
        self._skipped_steps = int(value)

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last step was skipped (on a GPU the verdict stays on the device until read here)."""
        self._resolve_verdicts()
        return self._last_step_skipped

    @last_step_skipped.setter
    def last_step_skipped(self, value: bool) -> None:
        self._resolve_verdicts()
        self._last_step_skipped = bool(value)

    def _resolve_verdicts(self) -> None:
        """The device verdicts of the steps since the last read, into the counters (one host read)."""
        pending = self.__dict__.get("_pending_skips")
        if pending is None:
            return
        self._pending_skips = None
        count, last = torch.stack(pending).tolist()  # (both fp32 on one device: one read)
        self._skipped_steps += int(count)
        self._last_step_skipped = last > 0
        if count:
            log.warning("%s: non-finite gradients, %d step(s) skipped (no weight or state changed; %d skipped so far)",
                        self._where, int(count), self._skipped_steps)

    @property
    def overflow(self) -> bool:
        """Whether the last step was skipped, under the name DeepSpeed's engine reads after every step: a skip
        then counts in ``engine.skipped_steps`` and does not advance its LR scheduler, as with DeepSpeed's own
        wrappers (where our optimizer is the engine's own optimizer: stage 0 fp32)."""
        return self.last_step_skipped

    def _consensus(self) -> object | None:
        """The ranks that must agree on skipping a step: the integration's group, or, with DTensor parameters,
        every rank (their matrices and AdamW shards span the mesh)."""
        if self._consensus_group is not None or not self._has_dtensors or not dist.is_initialized():
            return self._consensus_group
        return dist.group.WORLD

    def _agree(self, bad: bool) -> bool:
        group = self._consensus()
        if group is None or not dist.is_initialized():
            return bad
        # One buffer for the optimizer's life: a tensor that a gloo work item still holds when Python drops it
        # is freed on gloo's thread, which aborts the process if that happens while the interpreter exits.
        flag = self._verdict
        flag.fill_(1.0 if bad else 0.0)
        all_reduce_sum(flag, group)
        return bool(flag.item() > 0)


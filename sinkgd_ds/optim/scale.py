"""SCALE (Glentis et al., arXiv 2506.16659): column-normalised SGD, momentum on the last layer only.

As in the official code (OptimAI-Lab/Minimalist_LLM_Pretraining, ``scale_optimizer.py``):
  * hidden matrices (torch [out, in]): each output unit's gradient row is scaled to RMS 1
    ("normalising along the output dimension" in the paper's W in R^{d_in x d_out} convention);
  * embedding [vocab, d]: each hidden channel (column) is scaled to RMS 1 over the vocabulary;
  * LM head: momentum m = beta m + (1 - beta) g (beta 0.9), then rows scaled to RMS 1;
  * 1-D parameters (norms, biases): AdamW.
RMS 1 over n entries is l2 norm sqrt(n): exactly one half-iteration of the Sinkhorn engine, so the
sharded layouts work unchanged. The official clamp (rms >= 1e-8) only differs from the engine's
zero-row rule for rows with RMS below 1e-8.

Defaults: lr=0.02 (AdamW groups; the official adam_lr default) with lr_scale=0.05, so matrices use
1e-3, the official matrix lr for 60M-350M; momentum=0.9; weight_decay=0 (official scripts).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import hparams as hp
from ..integrations.dtensor import is_dtensor, local_tensor
from .base import ADAMW, MatrixOptimizer, logical_shape
from .sinkgd import apply_normalized, prepare_normalized

SCALE_MATRIX, SCALE_EMBED, SCALE_HEAD = "scale", "scale_embed", "scale_head"
HEAD_PATTERNS = (r"lm_head", r"output_layer")
EMBED_PATTERNS = (r"embed", r"\bwte\b", r"\bwpe\b")
# The head momentum m = beta m + (1 - beta) g is Adam's first moment, so it carries Adam's key name:
# DeepSpeed's universal-checkpoint tools only carry the state keys "exp_avg", "exp_avg_sq", "step".
HEAD_STATE = "exp_avg"


class SCALE(MatrixOptimizer):
    GROUP_KEYS = (*MatrixOptimizer.GROUP_KEYS, "momentum")
    MATRIX_KINDS = (SCALE_MATRIX, SCALE_EMBED, SCALE_HEAD)

    def __init__(self, params, lr: float = 0.02, lr_scale: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 head_patterns=HEAD_PATTERNS, embed_patterns=EMBED_PATTERNS, implementation: str = "auto",
                 stochastic_rounding: bool = True, rounding_seed: int = 0, **unknown: Any):
        if unknown:
            hp.check_known_keys(f"{type(self).__name__}()", unknown,
                                [*self.GROUP_KEYS, "head_patterns", "embed_patterns", *self.OPTIONS])
        hp.regex_list(f"{type(self).__name__}()", "head_patterns", head_patterns)
        hp.regex_list(f"{type(self).__name__}()", "embed_patterns", embed_patterns)
        defaults = dict(lr=lr, lr_scale=lr_scale, momentum=momentum, weight_decay=weight_decay,
                        betas=betas, eps=eps, kind=None)
        super().__init__(params, defaults, fallback_patterns=(r"(?!)",),  # nothing 2-D falls back by name
                         config=dict(head_patterns=tuple(head_patterns), embed_patterns=tuple(embed_patterns)),
                         implementation=implementation, stochastic_rounding=stochastic_rounding,
                         rounding_seed=rounding_seed)

    PERSISTENT = (*MatrixOptimizer.PERSISTENT, "head_patterns", "embed_patterns")

    def _compile_patterns(self) -> None:
        super()._compile_patterns()
        self._head_re = hp.regex_list(self._where, "head_patterns", self.head_patterns)
        self._embed_re = hp.regex_list(self._where, "embed_patterns", self.embed_patterns)

    def classify(self, name, p):
        if len(logical_shape(p)) < 2:
            return ADAMW
        if name is not None and any(r.search(name) for r in self._head_re):
            return SCALE_HEAD
        if name is not None and any(r.search(name) for r in self._embed_re):
            return SCALE_EMBED
        return SCALE_MATRIX

    def _validate_extra(self, where: str, key: str, value: Any) -> None:
        if key == "momentum":
            hp.unit_interval(where, key, value)

    def _momentum(self, t):
        """Direction of the head: its momentum (for a DTensor head, the local block of its momentum)."""
        m = self.state[self._param_of(t)][HEAD_STATE]
        return local_tensor(m) if is_dtensor(m) else m

    def _prepare_matrices(self, group, final=False):
        if group["kind"] == SCALE_HEAD:  # normalised after the momentum update, in _apply_matrices
            specs = self.matrix_specs(group)
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if self._device_mode:
                return {"specs": specs, "flag": self._nonfinite_flag(grads)}
            return {"specs": specs, "nonfinite": self._local_nonfinite(grads)}
        schedule = ("col",) if group["kind"] == SCALE_EMBED else ("row",)
        return prepare_normalized(self, group, schedule, final=final)

    def _apply_matrices(self, group, plan, gate=None):
        if group["kind"] != SCALE_HEAD:
            apply_normalized(self, group, plan, gate)
            return
        beta = group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if HEAD_STATE not in st:
                # (contiguous: the engine reads it as the flat rows of the matrix)
                st[HEAD_STATE] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            if gate is None:
                st[HEAD_STATE].lerp_(p.grad.to(p.dtype), 1.0 - beta)
            else:  # (a skipped step keeps the old momentum; a NaN gradient never enters it)
                st[HEAD_STATE].copy_(torch.where(gate > 0, st[HEAD_STATE],
                                                 st[HEAD_STATE].lerp(p.grad.to(p.dtype), 1.0 - beta)))
        group_plan = prepare_normalized(self, {**group, "params": [p for p in group["params"] if p.grad is not None]},
                                        ("row",), direction=self._momentum)
        apply_normalized(self, group, group_plan, gate)


"""A small LM with odd-sized matrices (ZeRO cuts them mid-row) plus embedding, norm and LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

VOCAB, D, FF, SEQ, BATCH = 13, 7, 11, 5, 6
MATRICES = ("up.weight", "down.weight")
FALLBACK = ("embed_tokens.weight", "norm.weight", "norm.bias", "up.bias", "lm_head.weight")


class OddLM(torch.nn.Module):
    def __init__(self, vocab: int = VOCAB, d: int = D, ff: int = FF):
        super().__init__()
        self.vocab = vocab
        self.embed_tokens = torch.nn.Embedding(vocab, d)
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, ff)
        self.down = torch.nn.Linear(ff, d, bias=False)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, self.vocab), ids[:, 1:].reshape(-1))


def make_model(seed: int = 0) -> OddLM:
    torch.manual_seed(seed)
    return OddLM()


def batches(steps: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(steps)]

"""LLaMA shapes: the parameters the engines build from a run config, name by name, in their order.

The order matters for the memory model: ZeRO-1/2 cut each param group's flat buffer at fixed offsets and
Megatron's DistributedOptimizer cuts its (reversed) buffer, so which rank holds which parameter, and how much
padding there is, depends on where each parameter sits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = ["FAMILY", "LlamaShape", "Param", "hf_params", "load_shape", "megatron_params"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def hf_params(s: LlamaShape) -> list[Param]:
    """``LlamaForCausalLM(...).named_parameters()`` (launch/trainer.py ``build_model``), tied head omitted."""
    h, kv = s.hidden, s.kv_heads * s.head_dim
    out = [Param("model.embed_tokens.weight", (s.vocab, h))]
    for i in range(s.layers):
        pre = f"model.layers.{i}."
        out += [Param(pre + "self_attn.q_proj.weight", (h, h)), Param(pre + "self_attn.k_proj.weight", (kv, h)),
                Param(pre + "self_attn.v_proj.weight", (kv, h)), Param(pre + "self_attn.o_proj.weight", (h, h)),
                Param(pre + "mlp.gate_proj.weight", (s.intermediate, h)),
                Param(pre + "mlp.up_proj.weight", (s.intermediate, h)),
                Param(pre + "mlp.down_proj.weight", (h, s.intermediate)),
                Param(pre + "input_layernorm.weight", (h,)), Param(pre + "post_attention_layernorm.weight", (h,))]
    out.append(Param("model.norm.weight", (h,)))
    if not s.tie_embeddings:
        out.append(Param("lm_head.weight", (s.vocab, h)))
    return out


def megatron_params(s: LlamaShape) -> list[Param]:
    """Megatron ``GPTModel`` with the local layer spec and the LLaMA recipe (launch/pretrain_megatron.py
    ``build_model``, tensor-parallel size 1): fused Q/K/V and gate/up, RMSNorm weights, no biases."""
    h, kv = s.hidden, s.kv_heads * s.head_dim
    out = [Param("embedding.word_embeddings.weight", (s.vocab, h))]
    for i in range(s.layers):
        pre = f"decoder.layers.{i}."
        out += [Param(pre + "input_layernorm.weight", (h,)), Param(pre + "self_attention.linear_proj.weight", (h, h)),
                Param(pre + "self_attention.linear_qkv.weight", (h + 2 * kv, h)),
                Param(pre + "pre_mlp_layernorm.weight", (h,)),
                Param(pre + "mlp.linear_fc1.weight", (2 * s.intermediate, h)),
                Param(pre + "mlp.linear_fc2.weight", (h, s.intermediate))]
    out.append(Param("decoder.final_layernorm.weight", (h,)))
    if not s.tie_embeddings:
        out.append(Param("output_layer.weight", (s.vocab, h)))
    return out


def _llama(hidden: int, intermediate: int, heads: int, layers: int) -> LlamaShape:
    return LlamaShape(hidden, intermediate, heads, heads, layers, vocab=32000)


# The papers' LLaMA family (GaLore/APOLLO benchmark configs 60M-1B; SCALE's 7B is LLaMA-7B), continued with the
# larger LLaMA-1 shapes (13B, 33B, 65B: dim / heads / layers of the LLaMA paper's Table 2, intermediate sizes of
# their released configs) so the "largest that fits" search has somewhere to go. Vocabulary 32000 (T5 / LLaMA).
FAMILY: dict[str, LlamaShape] = {
    "60m": _llama(512, 1376, 8, 8),
    "130m": _llama(768, 2048, 12, 12),
    "350m": _llama(1024, 2736, 16, 24),
    "1b": _llama(2048, 5461, 32, 24),
    "7b": _llama(4096, 11008, 32, 32),
    "13b": _llama(5120, 13824, 40, 40),
    "33b": _llama(6656, 17920, 52, 60),
    "65b": _llama(8192, 22016, 64, 80),
}


class ShapeError(ValueError):
    """A model name or config the memory model cannot read; the message says what is allowed."""


def load_shape(model: str, vocab: int | None = None) -> tuple[str, LlamaShape]:
    """``tiny`` / ``60m`` / ... (configs/models/<name>.json, else the built-in family) or a JSON path, with the
    vocabulary from ``vocab`` or else the config's ``data.vocab_size`` (4096 when the config has none, as
    launch/config.py defaults it). Returns (name, shape)."""
    path = Path(model)
    if not (path.suffix == ".json" or "/" in model):
        path = CONFIG_DIR / f"{model}.json"
        if not path.is_file():
            if model in FAMILY:
                shape = FAMILY[model]
                return model, shape if vocab is None else replace(shape, vocab=vocab)
            known = sorted({p.stem for p in CONFIG_DIR.glob("*.json")} | set(FAMILY))
            raise ShapeError(f"--model {model!r} is not known; allowed: {', '.join(known)}, or a path to a JSON "
                             "run config (configs/models/*.json layout)")
    if not path.is_file():
        raise ShapeError(f"--model {model}: no such file")
    try:
        cfg = json.loads(path.read_text())
        m = cfg["model"]
        heads = int(m["num_attention_heads"])
        shape = LlamaShape(hidden=int(m["hidden_size"]), intermediate=int(m["intermediate_size"]), heads=heads,
                           kv_heads=int(m.get("num_key_value_heads") or heads), layers=int(m["num_hidden_layers"]),
                           vocab=int(vocab if vocab is not None else cfg.get("data", {}).get("vocab_size", 4096)),
                           tie_embeddings=bool(m.get("tie_word_embeddings", False)))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ShapeError(f"--model {model}: not a run config with model.hidden_size, intermediate_size, "
                         f"num_attention_heads and num_hidden_layers ({type(e).__name__}: {e})") from None
    if shape.vocab <= 0:
        raise ShapeError(f"--vocab {shape.vocab}: must be a positive integer")
    return path.stem, shape

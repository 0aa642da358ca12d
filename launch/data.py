"""Tokens for training: a byte-level BPE trained on the train split, cached token arrays, fixed batches.

Batches are a pure function of (seed, step): resuming at step k replays exactly the batches an
uninterrupted run would have seen, with no data-loader state in the checkpoint. The global batch does
not depend on how it is cut into ranks / micro batches.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .corpus import Corpus, DataError, cache_dir, cache_lock, load_corpus, sha256_bytes, sha256_file, write_atomic
from .english_corpus import english

EOS = "<|endoftext|>"
# Byte-level BPE (tokenizers 0.23.3) trained on the Shakespeare train split; pinned per vocab size.
PINNED_TOKENIZER_SHA256 = {4096: "c7a173c6ea26fcfedcdfd4efc17843d215eb3ceff2cb5f34e1697770a689988b"}
PINNED_TOKENS_SHA256 = {4096: {"train": "e854c054f07825366f19967a60f26f9b493a4aeaf597c90a03f92ddf842705a1",
                               "val": "6deeda24f553b3d13d2d25c8724587d951c96a71c6c9aac2bd4678c6d493e178"}}


@dataclass
class TokenData:
    """Train/val token streams (memory-mapped) plus what identifies them."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    sha256: dict[str, str] = field(default_factory=dict)
    describe: str = ""


# ---------------------------------------------------------------------- tokenizer
def train_tokenizer(corpus: Corpus, vocab_size: int) -> Path:
    """Byte-level BPE on the train split only (the val split must stay unseen), cached by (train hash, vocab)."""
    from tokenizers import ByteLevelBPETokenizer

    out = cache_dir() / "tokenizers" / f"bpe{vocab_size}-{corpus.sha256['train'][:16]}.json"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tok = ByteLevelBPETokenizer()
        tok.train([str(corpus.train)], vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                  show_progress=False)
        write_atomic(out, tok.to_str().encode())
    return out


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions
        raise DataError(f"data.tokenizer {str(path)!r}: not a Hugging Face tokenizers JSON file ({e})") from None


def encode_file(tok, path: Path) -> np.ndarray:
    """Encode line blocks in parallel (tokenizers' Rust threads); the concatenation is deterministic."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    blocks = ["".join(lines[i:i + 256]) for i in range(0, len(lines), 256)]
    ids: list[int] = []
    for enc in tok.encode_batch(blocks, add_special_tokens=False):
        ids.extend(enc.ids)
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.int32
    return np.asarray(ids, dtype=dtype)


def tokenize_corpus(corpus: Corpus, vocab_size: int, tokenizer: str | None) -> TokenData:
    with cache_lock():
        tok_path = Path(tokenizer).expanduser() if tokenizer else train_tokenizer(corpus, vocab_size)
        if not tok_path.exists():
            raise DataError(f"data.tokenizer {tokenizer!r}: no such file")
        tok_sha = sha256_file(tok_path)
        pinned = PINNED_TOKENIZER_SHA256.get(vocab_size) if corpus.name == "shakespeare" and not tokenizer else None
        if pinned is not None and tok_sha != pinned:
            raise DataError(f"tokenizer {tok_path}: sha256 {tok_sha} is not the pinned {pinned} (tokenizers version "
                            "differs from constraints.txt?); delete the file to retrain")
        tok = load_tokenizer(tok_path)
        out = cache_dir() / "tokens" / f"{tok_sha[:16]}-{corpus.sha256['train'][:12]}-{corpus.sha256['val'][:12]}"
        arrays = {}
        for split in ("train", "val"):
            npy = out / f"{split}.npy"
            if not npy.exists():
                out.mkdir(parents=True, exist_ok=True)
                arr = encode_file(tok, getattr(corpus, split))
                tmp = out / f"{split}.tmp.npy"
                np.save(tmp, arr)
                tmp.replace(npy)
            arrays[split] = np.load(npy, mmap_mode="r")
    sha = {f"text_{k}": v for k, v in corpus.sha256.items()}
    sha["tokenizer"] = tok_sha
    sha.update({f"tokens_{k}": sha256_bytes(np.ascontiguousarray(a).tobytes()) for k, a in arrays.items()})
    pinned_tokens = PINNED_TOKENS_SHA256.get(vocab_size) if pinned is not None else None
    if pinned_tokens and {k: sha[f"tokens_{k}"] for k in pinned_tokens} != pinned_tokens:
        raise DataError(f"token arrays under {out} do not match the pinned hashes {pinned_tokens}; "
                        "delete that directory to rebuild")
    return TokenData(arrays["train"], arrays["val"], tok.get_vocab_size(), sha,
                     f"{corpus.name}: {len(arrays['train']):,} train / {len(arrays['val']):,} val tokens, "
                     f"tokenizer {tok_path.name} (vocab {tok.get_vocab_size()})")


# ---------------------------------------------------------------------- Megatron indexed (.bin/.idx)
def megatron_tokens(prefix: str, vocab_size: int, val_fraction: float) -> TokenData:
    """Already-tokenized data written by Megatron's preprocess_data.py: the .bin is the sequences back to back,
    so the stream is one memmap; the last ``val_fraction`` of the sequences is validation."""
    base = prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix
    for ext in (".bin", ".idx"):
        if not Path(base + ext).is_file():
            raise DataError(f"--data megatron:{prefix}: no such file {base + ext}")
    try:
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    except ImportError:
        raise DataError("--data megatron:...: megatron-core is not installed (pip install megatron-core)") from None
    ds = IndexedDataset(base, mmap=True)
    n = len(ds)
    if n < 2:
        raise DataError(f"--data megatron:{prefix}: {n} sequence(s); need at least 2 to split train/val")
    dtype = ds.index.dtype
    stream = np.memmap(base + ".bin", dtype=dtype, mode="r")
    cut_seq = min(n - 1, max(1, int(n * (1.0 - val_fraction))))
    cut = int(ds.index.sequence_pointers[cut_seq]) // np.dtype(dtype).itemsize
    train, val = stream[:cut], stream[cut:]
    if vocab_size <= 0:
        raise DataError("--data megatron:...: set data.vocab_size to the tokenizer's vocabulary size")
    top = int(max(train[: 1 << 24].max(), val[: 1 << 24].max()))
    if top >= vocab_size:
        raise DataError(f"--data megatron:{prefix}: token id {top} >= data.vocab_size={vocab_size}")
    sha = {"idx": sha256_file(Path(base + ".idx")), "bin": sha256_file(Path(base + ".bin"))}
    return TokenData(train, val, vocab_size, sha, f"megatron {base}: {len(train):,} train / {len(val):,} val tokens")


def write_megatron(prefix: str, docs: list[list[int]], vocab_size: int) -> None:
    """Write documents as a Megatron indexed dataset (for tests and for converting our tokens)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    for d in docs:
        builder.add_document(torch.tensor(d), [len(d)])
    builder.finalize(prefix + ".idx")


def load_tokens(source: str, vocab_size: int, val_fraction: float, tokenizer: str | None = None,
                text_column: str = "text") -> TokenData:
    if source.startswith("megatron:"):
        return megatron_tokens(source[len("megatron:"):], vocab_size, val_fraction)
    if source == "english":
        with cache_lock():
            corpus = english(val_fraction)
    else:
        corpus = load_corpus(source, val_fraction, text_column)
    return tokenize_corpus(corpus, vocab_size, tokenizer)


# ---------------------------------------------------------------------- batches
def check_lengths(data: TokenData, seq_len: int, eval_sequences: int) -> None:
    for split, arr in (("train", data.train), ("val", data.val)):
        if len(arr) < seq_len + 1:
            raise DataError(f"the {split} split has {len(arr)} tokens, fewer than train.seq_len+1={seq_len + 1}")
    if eval_sequences and len(data.val) < seq_len * eval_sequences:
        raise DataError(f"the val split has {len(data.val)} tokens; eval.sequences={eval_sequences} windows of "
                        f"{seq_len} need {seq_len * eval_sequences}. Lower eval.sequences.")


def train_batch(data: TokenData, seed: int, step: int, global_batch: int, seq_len: int,
                rows: slice, order: str = "random") -> torch.Tensor:
    """Rows ``rows`` of step ``step``'s global batch, from (seed, step) alone so any rank and any resume draws the
    same. ``random``: windows at random offsets, with replacement. ``shuffled``: the split's non-overlapping windows
    in a seeded order per epoch, so a run shorter than an epoch never sees a token twice."""
    if order == "shuffled":
        first = step * global_batch
        starts = torch.tensor([shuffled_start(len(data.train), seq_len, seed, first + i)
                               for i in range(global_batch)[rows]], dtype=torch.int64)
    else:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(data.train) - seq_len, (global_batch,), generator=gen)[rows]
    return torch.from_numpy(np.stack([np.asarray(data.train[s:s + seq_len], dtype=np.int64) for s in starts.tolist()]))


def windows_per_epoch(n_tokens: int, seq_len: int) -> int:
    return n_tokens // seq_len


@functools.lru_cache(maxsize=4)
def epoch_order(n_windows: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * epoch + 1))


def shuffled_start(n_tokens: int, seq_len: int, seed: int, index: int) -> int:
    """The start of the ``index``-th training window of the shuffled order (epoch after epoch)."""
    n = windows_per_epoch(n_tokens, seq_len)
    return int(epoch_order(n, seed, index // n)[index % n]) * seq_len


def val_windows(data: TokenData, seq_len: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced, non-overlapping windows of the val split; the same every evaluation."""
    stride = (len(data.val) - seq_len) // max(1, count - 1) if count > 1 else 0
    stride = max(stride, seq_len) if count > 1 else 0
    starts = [min(i * stride, len(data.val) - seq_len) for i in range(count)]
    return torch.from_numpy(np.stack([np.asarray(data.val[s:s + seq_len], dtype=np.int64) for s in starts]))


def describe_hashes(data: TokenData) -> str:
    return json.dumps(data.sha256, sort_keys=True)

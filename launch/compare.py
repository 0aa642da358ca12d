"""Optimizers side by side on the main job: ``make compare``.

    python launch/compare.py                                  # AdamW lr sweep, SinkGD L=5 / L=1, SCALE, SWAN
    python launch/compare.py --optimizers adamw sinkgd-l5 --steps 100 --seeds 0 1 2

Every run is launch/pretrain.py under launch/run_deepspeed.sh (the launcher ``make demo`` uses), on the same
model, data, schedule, seed, world size and ZeRO stage; only the DeepSpeed JSON's optimizer line differs
(derived from configs/zero<stage>_<optimizer>.json and written into the run directory). The best AdamW lr by
final val loss is the baseline, and every run is scored by the tokens it needs to reach the baseline's final
val loss: the papers' "same perplexity with 40% of the tokens". Runs that finished with the same settings are
reused, interrupted ones resumed. See docs/compare.md.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `launch` importable

from launch.config import MODELS_DIR, ROOT, ConfigError, load_run_config, model_file, read_json  # noqa: E402
from launch.local_jobs import free_port  # noqa: E402

LAUNCHER = ROOT / "launch" / "run_deepspeed.sh"
RECORD = "compare_run.json"  # what compare.py knows about a run directory: its settings, wall time
STAGES = (1, 2, 3)  # configs/zero{1,2,3}_*.json


@dataclass(frozen=True)
class Family:
    """One entry of --optimizers: the repo's DeepSpeed JSON it starts from and the params it changes."""

    config: str  # configs/zero<stage>_<config>.json
    params: dict[str, Any]
    label: str


FAMILIES: dict[str, Family] = {
    "adamw": Family("adamw", {}, "AdamW (one run per --adamw-lrs value)"),
    "sinkgd-l5": Family("sinkgd", {"sinkhorn_iters": 5}, "SinkGD, L=5 Sinkhorn iterations (the paper's)"),
    "sinkgd-l1": Family("sinkgd", {"sinkhorn_iters": 1}, "SinkGD, L=1"),
    "scale": Family("scale", {}, "SCALE"),
    "swan": Family("swan", {}, "SWAN"),
}
DEFAULT_ADAMW_LRS = (1e-3, 2e-3, 4e-3, 8e-3)  # configs/zero*_adamw.json uses 1e-3; tiny models like it higher
# --set keys that have their own option (two ways to set one value would make run identities ambiguous)
OWN_OPTION = {"train.steps": "--steps", "train.seed": "--seeds", "eval.every": "--eval-every"}
# kept unless --set says otherwise: one checkpoint is all that resuming needs, and a sweep is many runs
DEFAULT_SETS = ("checkpoint.keep=1",)


class OptionError(ValueError):
    """A bad command-line value; the message names the option, the value and what is allowed."""


# ---------------------------------------------------------------------- options
@dataclass
class Options:
    model: str = "tiny"
    steps: int | None = None
    stage: int = 2
    world: int = 2
    optimizers: list[str] = field(default_factory=lambda: list(FAMILIES))
    adamw_lrs: list[float] = field(default_factory=lambda: list(DEFAULT_ADAMW_LRS))
    sinkgd_lrs: list[float] | None = None  # None: the repo JSON's lr, one run per SinkGD family
    seeds: list[int] | None = None
    out: Path = ROOT / "runs" / "compare"
    eval_every: int | None = None
    sets: list[str] = field(default_factory=list)
    overwrite: bool = False
    dry_run: bool = False
    report_only: bool = False


def build_parser() -> argparse.ArgumentParser:
    """Values are taken as strings and checked by ``validate_options``, so every error has the same form."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="configs/models name or a JSON path (default: %(default)s)")
    ap.add_argument("--steps", default=None, help="train.steps for every run (default: the model config's)")
    ap.add_argument("--stage", default="2", help="ZeRO stage 1, 2 or 3 (default: %(default)s)")
    ap.add_argument("--world", default="2", help="ranks per run (default: %(default)s)")
    ap.add_argument("--optimizers", nargs="+", default=None, metavar="NAME",
                    help=f"subset of {', '.join(FAMILIES)} (default: all; commas also separate)")
    ap.add_argument("--adamw-lrs", nargs="+", default=None, metavar="LR",
                    help=f"AdamW lr sweep (default: {' '.join(f'{lr:g}' for lr in DEFAULT_ADAMW_LRS)})")
    ap.add_argument("--sinkgd-lrs", nargs="+", default=None, metavar="LR",
                    help="SinkGD lrs to sweep (one run each for sinkgd-l5 / sinkgd-l1; default: the repo JSON's lr)")
    ap.add_argument("--seeds", nargs="+", default=None, metavar="SEED",
                    help="train.seed values; more than one: mean and spread (default: the model config's)")
    ap.add_argument("--eval-every", default=None, help="eval.every in steps (default: the model config's)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="any other run-config override, passed to every run (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "compare"), help="sweep directory (default: %(default)s)")
    ap.add_argument("--overwrite", action="store_true", help="start every run afresh instead of reusing/resuming")
    ap.add_argument("--dry-run", action="store_true", help="check the options, print the plan, run nothing")
    ap.add_argument("--report-only", action="store_true",
                    help="report the runs that finished, start none (the others are listed as not run yet)")
    return ap


def _split(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v]


def _closest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def positive_int(option: str, text: str, minimum: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise OptionError(f"{option}={text!r} must be an integer >= {minimum}") from None
    if value < minimum:
        raise OptionError(f"{option}={text!r} must be an integer >= {minimum}")
    return value


def no_duplicates(option: str, values: Sequence[Any]) -> None:
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise OptionError(f"{option}: {', '.join(repeated)} given more than once; each value runs once")


def parse_optimizers(values: Sequence[str] | None) -> list[str]:
    names = _split(values)
    if names is None:
        return list(FAMILIES)
    if not names:
        raise OptionError(f"--optimizers is empty; allowed: {', '.join(FAMILIES)}")
    for name in names:
        if name.lower() not in FAMILIES:
            raise OptionError(f"--optimizers {name!r} is not known.{_closest(name.lower(), FAMILIES)} "
                              f"Allowed: {', '.join(FAMILIES)}.")
    names = [n.lower() for n in names]
    no_duplicates("--optimizers", names)
    return names


def parse_lrs(values: Sequence[str] | None, option: str = "--adamw-lrs") -> list[float]:
    texts = _split(values)
    if texts is None:
        return list(DEFAULT_ADAMW_LRS)
    if not texts:
        raise OptionError(f"{option} is empty; give at least one lr, e.g. {option} 1e-3 2e-3")
    lrs = []
    for text in texts:
        try:
            lr = float(text)
        except ValueError:
            raise OptionError(f"{option} {text!r} is not a number; allowed: numbers in (0, 1]") from None
        if not (math.isfinite(lr) and 0.0 < lr <= 1.0):
            raise OptionError(f"{option} {text!r} must be in (0, 1]")
        lrs.append(lr)
    no_duplicates(option, lrs)
    return lrs


def parse_seeds(values: Sequence[str] | None) -> list[int] | None:
    texts = _split(values)
    if texts is None:
        return None
    if not texts:
        raise OptionError("--seeds is empty; give at least one integer >= 0")
    seeds = [positive_int("--seeds", t, minimum=0) for t in texts]
    no_duplicates("--seeds", seeds)
    return seeds


def check_sets(sets: Sequence[str]) -> None:
    """The keys with their own option are refused here; everything else is the run config's to check."""
    for item in sets:
        key = item.partition("=")[0].strip()
        if key in OWN_OPTION:
            raise OptionError(f"--set {item!r}: use {OWN_OPTION[key]} for {key} (it is part of every run's name "
                              "and settings)")


def validate_options(ns: argparse.Namespace) -> Options:
    """Every option checked before anything runs; the run config (model, --set) is checked as the main job does."""
    opts = Options(
        model=ns.model, stage=positive_int("--stage", ns.stage), world=positive_int("--world", ns.world),
        steps=None if ns.steps is None else positive_int("--steps", ns.steps),
        eval_every=None if ns.eval_every is None else positive_int("--eval-every", ns.eval_every),
        optimizers=parse_optimizers(ns.optimizers), seeds=parse_seeds(ns.seeds), sets=list(ns.sets),
        out=Path(ns.out).resolve(), overwrite=ns.overwrite, dry_run=ns.dry_run, report_only=ns.report_only)
    if opts.stage not in STAGES:
        raise OptionError(f"--stage={ns.stage!r} must be one of {', '.join(map(str, STAGES))} "
                          "(configs/zero{1,2,3}_*.json)")
    if "adamw" in opts.optimizers:
        opts.adamw_lrs = parse_lrs(ns.adamw_lrs)
    elif ns.adamw_lrs is not None:
        raise OptionError("--adamw-lrs is given but adamw is not in --optimizers")
    sinkgd = [f for f in opts.optimizers if f.startswith("sinkgd")]
    if ns.sinkgd_lrs is not None:
        if not sinkgd:
            raise OptionError("--sinkgd-lrs is given but neither sinkgd-l5 nor sinkgd-l1 is in --optimizers")
        opts.sinkgd_lrs = parse_lrs(ns.sinkgd_lrs, "--sinkgd-lrs")
    check_sets(opts.sets)
    if opts.out.exists() and not opts.out.is_dir():
        raise OptionError(f"--out {ns.out}: exists and is not a directory")
    try:
        model_file(opts.model)
    except ConfigError as e:
        raise OptionError(str(e)) from None
    return opts


# ---------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class RunSpec:
    """One configuration (``name``) at one seed."""

    name: str  # e.g. adamw-lr0.002, sinkgd-l5: the same across seeds
    family: str
    params: dict[str, Any]  # optimizer.params overrides on top of the repo's JSON
    seed: int

    @property
    def run_name(self) -> str:
        return f"{self.name}-seed{self.seed}"


def plan_specs(opts: Options, default_seed: int) -> list[RunSpec]:
    """In --optimizers order (AdamW first by default: its best lr is the baseline), each configuration's seeds
    one after another."""
    specs = []
    for seed in opts.seeds or [default_seed]:
        for fam in opts.optimizers:
            if fam == "adamw":
                specs += [RunSpec(f"adamw-lr{lr:g}", fam, {"lr": lr}, seed) for lr in opts.adamw_lrs]
            elif fam.startswith("sinkgd") and opts.sinkgd_lrs:
                specs += [RunSpec(f"{fam}-lr{lr:g}", fam, {**FAMILIES[fam].params, "lr": lr}, seed)
                          for lr in opts.sinkgd_lrs]
            else:
                specs.append(RunSpec(fam, fam, dict(FAMILIES[fam].params), seed))
    order = {name: i for i, name in enumerate(dict.fromkeys(s.name for s in specs))}
    return sorted(specs, key=lambda s: (order[s.name], s.seed))


def run_overrides(opts: Options, seed: int) -> list[str]:
    """The main job's --set list for one run: compare's defaults, the user's --set, then the dedicated options."""
    user_keys = {s.partition("=")[0].strip() for s in opts.sets}
    sets = [s for s in DEFAULT_SETS if s.partition("=")[0] not in user_keys] + list(opts.sets)
    if opts.steps is not None:
        sets.append(f"train.steps={opts.steps}")
    if opts.eval_every is not None:
        sets.append(f"eval.every={opts.eval_every}")
    return sets + [f"train.seed={seed}"]


def derive_ds_config(stage: int, spec: RunSpec) -> dict[str, Any]:
    """The repo's configs/zero<stage>_<optimizer>.json with the spec's optimizer params changed; nothing else."""
    base = read_json(ROOT / "configs" / f"zero{stage}_{FAMILIES[spec.family].config}.json", "DeepSpeed config")
    base["optimizer"].setdefault("params", {}).update(spec.params)
    return base


@dataclass
class Job:
    spec: RunSpec
    run_dir: Path
    overrides: list[str]
    run_config: dict[str, Any]
    ds_config: dict[str, Any]
    world: int

    @property
    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run: a finished one with this identity is reused."""
        return normalise({"run_config": self.run_config, "ds_config": self.ds_config, "world": self.world})

    @property
    def steps(self) -> int:
        return self.run_config["train"]["steps"]


def normalise(data: Any) -> Any:
    """As it reads back from JSON (tuples become lists), so a stored identity compares equal to a fresh one."""
    return json.loads(json.dumps(data, sort_keys=True))


def build_jobs(opts: Options) -> list[Job]:
    """Every run's config, validated as the main job validates it (unknown --set keys, bad values)."""
    base = load_run_config(opts.model, run_overrides(opts, 0)[:-1])
    if not base["eval"]["every"]:
        raise OptionError(f"--model {opts.model}: eval.every=0 (no validation), but the comparison is made on val "
                          "losses; pass --eval-every N")
    default_seed = base["train"]["seed"]
    jobs = []
    for spec in plan_specs(opts, default_seed):
        overrides = run_overrides(opts, spec.seed)
        run_config = load_run_config(opts.model, overrides)
        jobs.append(Job(spec, opts.out / spec.run_name, overrides, run_config, derive_ds_config(opts.stage, spec),
                        opts.world))
    return jobs


def preflight(jobs: Sequence[Job]) -> None:
    """Each run's DeepSpeed JSON through the main job's own checks (optimizer params, batch vs world size), so a
    bad combination fails now rather than an hour into the sweep."""
    from launch.config import resolve_ds_config

    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs:
            path = Path(tmp) / f"{job.spec.run_name}.json"
            path.write_text(json.dumps(job.ds_config))
            try:
                resolve_ds_config(path, job.run_config, job.run_dir, None, False, job.world)
            except ConfigError as e:
                raise OptionError(f"run {job.spec.run_name}: {e}".replace(str(path), "its DeepSpeed JSON")) from None


# ---------------------------------------------------------------------- reuse / resume / restart
def read_json_or_none(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def finished(summary: dict[str, Any] | None) -> bool:
    """The main job ran to its last step (a stop writes a summary too, with ``stopped_by`` and fewer steps)."""
    if not summary or summary.get("stopped_by") is not None:
        return False
    return summary.get("step") == summary.get("steps") and bool(summary.get("val"))


def decide(run_dir: Path, identity: dict[str, Any], overwrite: bool) -> str:
    """``reuse`` a finished run with the same settings, ``resume`` an interrupted one from its checkpoint,
    else ``fresh`` (nothing there, other settings, or --overwrite)."""
    if overwrite:
        return "fresh"
    record = read_json_or_none(run_dir / RECORD)
    if record is None or record.get("identity") != normalise(identity):
        return "fresh"
    if finished(read_json_or_none(run_dir / "summary.json")):
        return "reuse"
    if (run_dir / "checkpoints" / "latest").is_file():
        return "resume"
    return "fresh"


def prepare_run_dir(job: Job, decision: str) -> dict[str, Any]:
    """compare.py clears a directory itself instead of passing --overwrite to the main job: that would delete
    the DeepSpeed JSON and log.txt written here while the ranks still read and write them."""
    if decision == "fresh":
        shutil.rmtree(job.run_dir, ignore_errors=True)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    (job.run_dir / "ds_config.json").write_text(json.dumps(job.ds_config, indent=1))
    record = read_json_or_none(job.run_dir / RECORD) if decision == "resume" else None
    record = record or {"identity": job.identity, "wall_seconds": 0.0, "attempts": 0}
    write_record(job.run_dir, record)
    return record


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    (run_dir / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))


# ---------------------------------------------------------------------- running one job
def model_arg(model: str) -> str:
    """A configs/models name as is (the logged command stays readable), a JSON path made absolute (the launcher
    runs in the repo root)."""
    path = model_file(model)
    return model if path.parent == MODELS_DIR and path.stem == model else str(path.resolve())


def launch_command(job: Job, model: str, resume: bool) -> list[str]:
    sets = [a for s in job.overrides for a in ("--set", s)]
    return ["bash", str(LAUNCHER), "--deepspeed_config", str(job.run_dir / "ds_config.json"), "--model", model,
            *sets, "--no_progress", "--out", str(job.run_dir)] + (["--resume"] if resume else [])


def child_env(world: int) -> dict[str, str]:
    """run_deepspeed.sh's NPROC / MASTER_PORT; a free port, as other jobs may hold the default one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "NPROC": str(world), "MASTER_PORT": str(free_port())}


STEP_LINE = re.compile(r"^step\s+(\d+)\s")


def pump(stream: TextIO, log: TextIO, on_step: Callable[[int], None], eof: threading.Event) -> None:
    """Child output into log.txt; its ``step N ...`` lines (--no_progress) drive the sweep's progress line.
    ``eof`` is set once every process of the child closed the pipe, i.e. exited."""
    try:
        for line in stream:
            log.write(line)
            log.flush()
            match = STEP_LINE.match(line)
            if match:
                on_step(int(match.group(1)))
    finally:
        eof.set()


def stop_child(proc: subprocess.Popen, eof: threading.Event) -> None:
    """SIGTERM to the child's whole process group (launcher and ranks): the ranks save a checkpoint at the next
    step boundary and exit (the deepspeed runner itself does not forward a signal to them)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    eof.wait(timeout=120)
    proc.wait()


def run_child(cmd: list[str], env: dict[str, str], log_path: Path, on_step: Callable[[int], None],
              tick: Callable[[], None]) -> int:
    """The child in a session of its own, so Ctrl-C reaches compare.py only, which then stops the run cleanly.
    (Waiting on an Event, not Thread.join: a join interrupted by Ctrl-C marks a live thread as finished.)"""
    with open(log_path, "a") as log:
        log.write(f"$ NPROC={env['NPROC']} MASTER_PORT={env['MASTER_PORT']} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, start_new_session=True)
        eof = threading.Event()
        threading.Thread(target=pump, args=(proc.stdout, log, on_step, eof), daemon=True).start()
        try:
            while not eof.wait(timeout=1.0):
                tick()
        except KeyboardInterrupt:
            stop_child(proc, eof)
            raise
        return proc.wait()


def log_tail(path: Path, lines: int = 20) -> str:
    """The end of a failed run's log, without DeepSpeed's [INFO] lines (the error is what matters)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    kept = [line for line in text if line.strip() and "[INFO]" not in line]
    return "\n".join(kept[-lines:])


# ---------------------------------------------------------------------- progress
def fmt_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """One line for the whole sweep: run i/N, its name, its step, elapsed, ETA. In place on a terminal; on a
    pipe (logs, CI) only the permanent lines (a run starts, ends, fails)."""

    def __init__(self, total_runs: int, stream: TextIO | None = None):
        self.total_runs, self.stream = total_runs, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self.index, self.name, self.step, self.steps, self.first_step = 0, "", 0, 0, 0
        self.trained_steps = 0  # steps trained by finished runs of this invocation
        self.queued_steps = 0  # steps still to train after the current run
        self.width = 0

    def begin(self, index: int, name: str, steps: int, queued_steps: int, note: str) -> None:
        self.index, self.name, self.steps, self.step, self.first_step = index, name, steps, 0, 0
        self.queued_steps = queued_steps
        self.event(f"[{index}/{self.total_runs}] {name}: {note}")

    def on_step(self, step: int) -> None:
        if not self.first_step:
            self.first_step = step  # a resumed run starts counting where its checkpoint left off
        self.step = step

    def end(self) -> None:
        self.trained_steps += max(0, self.step - self.first_step + 1) if self.first_step else 0

    def eta(self) -> float | None:
        """Seconds per step so far (start-ups included, as they recur for every run) times the steps left;
        unknown until a run finished or the current one is a tenth through (before that its start-up dominates)."""
        current = self.step - self.first_step + 1 if self.first_step else 0
        if not self.trained_steps and current < max(1, self.steps // 10):
            return None
        remaining = self.queued_steps + max(0, self.steps - self.step)
        return (time.monotonic() - self.start) / (self.trained_steps + current) * remaining

    def line(self) -> str:
        step = f"step {self.step}/{self.steps}" if self.step else "starting"
        return (f"[{self.index}/{self.total_runs}] {self.name}  {step}  elapsed "
                f"{fmt_seconds(time.monotonic() - self.start)}  ETA {fmt_seconds(self.eta())}")

    def show(self) -> None:
        if self.tty:
            text = self.line()
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
            self.stream.flush()

    def event(self, text: str) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0
        self.stream.write(text + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------- the sweep
@dataclass
class Outcome:
    job: Job
    status: str  # reused | done | failed
    summary: dict[str, Any] | None = None
    wall_seconds: float = 0.0
    returncode: int | None = None
    log_tail: str = ""


def run_job(job: Job, decision: str, model: str, progress: Progress) -> Outcome:
    record = prepare_run_dir(job, decision)
    log_path = job.run_dir / "log.txt"
    t0 = time.monotonic()
    try:
        rc = run_child(launch_command(job, model, decision == "resume"), child_env(job.world), log_path,
                       progress.on_step, progress.show)
    finally:
        record["wall_seconds"] += time.monotonic() - t0
        record["attempts"] += 1
        write_record(job.run_dir, record)
    progress.end()
    summary = read_json_or_none(job.run_dir / "summary.json")
    if rc == 0 and finished(summary):
        return Outcome(job, "done", summary, record["wall_seconds"], rc)
    return Outcome(job, "failed", None, record["wall_seconds"], rc, log_tail(log_path))


def start_note(job: Job, decision: str) -> str:
    if decision == "resume":
        return "resuming from its checkpoint"
    if job.run_dir.exists():
        return "starting afresh (what was there had other settings, no checkpoint, or --overwrite)"
    return "starting"


def run_sweep(jobs: Sequence[Job], opts: Options, progress: Progress) -> list[Outcome]:
    """One job at a time (they share the cores and are timed); a failure is reported and the rest still run."""
    decisions = [decide(j.run_dir, j.identity, opts.overwrite) for j in jobs]
    model = model_arg(opts.model)
    outcomes = []
    for i, (job, decision) in enumerate(zip(jobs, decisions), start=1):
        queued = sum(j.steps for j, d in zip(jobs[i:], decisions[i:]) if d != "reuse")
        if decision == "reuse":
            summary = read_json_or_none(job.run_dir / "summary.json")
            record = read_json_or_none(job.run_dir / RECORD) or {}
            progress.event(f"[{i}/{len(jobs)}] {job.spec.run_name}: reused (finished earlier; val loss "
                           f"{summary['val_loss']:.4f})")
            outcomes.append(Outcome(job, "reused", summary, record.get("wall_seconds", 0.0), 0))
            continue
        if opts.report_only:
            progress.event(f"[{i}/{len(jobs)}] {job.spec.run_name}: not run yet (--report-only)")
            outcomes.append(Outcome(job, "not run", None, 0.0, None, "not run yet (--report-only)"))
            continue
        note = start_note(job, decision)
        progress.begin(i, job.spec.run_name, job.steps, queued, f"{note} (log {job.run_dir / 'log.txt'})")
        outcome = run_job(job, decision, model, progress)
        outcomes.append(outcome)
        report_outcome(progress, i, len(jobs), outcome)
    return outcomes


def report_outcome(progress: Progress, index: int, total: int, outcome: Outcome) -> None:
    name = outcome.job.spec.run_name
    if outcome.status == "done":
        s = outcome.summary
        progress.event(f"[{index}/{total}] {name}: done, val loss {s['val_loss']:.4f}, {s['tokens_per_s']:,.0f} "
                       f"tokens/s, wall time {fmt_seconds(outcome.wall_seconds)}"
                       + (f" (resumed at step {s['resumed_from']})" if s.get("resumed_from") else ""))
    else:
        tail = "\n".join("    " + line for line in outcome.log_tail.splitlines())
        progress.event(f"[{index}/{total}] {name}: FAILED (exit code {outcome.returncode}); the end of "
                       f"{outcome.job.run_dir / 'log.txt'}:\n{tail}")


# ---------------------------------------------------------------------- results
def tokens_to_target(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """The tokens at which a val curve first reaches ``target``, linearly interpolated between eval points;
    the first point itself if it is already there (nothing is known before it); None if never."""
    for i, (tokens, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return float(tokens)
            t0, l0 = curve[i - 1]
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0)
    return None


def mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Mean val loss per step over seeds, on the steps every seed evaluated at."""
    common = set.intersection(*(set(s for s, _ in c) for c in curves)) if curves else set()
    by_step = [dict(c) for c in curves]
    return [(s, statistics.fmean(d[s] for d in by_step)) for s in sorted(common)]


ACCOUNTED = "accounted tensors"  # summary["memory"]: weights, gradients, master weights, optimizer state


def memory_use(summary: dict[str, Any]) -> tuple[int | None, int | None, str]:
    """(total, optimizer state) bytes per rank, max over ranks, and what they measure: the accounted tensor bytes
    (``summary["memory"]``) when the main job writes them, else its peak memory."""
    memory = summary.get("memory")
    per_rank = memory.get("per_rank") if isinstance(memory, dict) else None
    if per_rank:
        total = max(int(r.get("total", 0)) for r in per_rank)
        state = max(int(r.get("optimizer_state_matrices", 0)) + int(r.get("optimizer_state_adamw", 0))
                    for r in per_rank)
        return total, state, ACCOUNTED
    peaks = summary.get("peak_memory_bytes") or []
    return (max(int(p) for p in peaks) if peaks else None), None, summary.get("memory_kind", "peak")


@dataclass
class ConfigResult:
    """One configuration over its seeds."""

    name: str
    family: str
    lr: float | None
    seeds: list[int]
    outcomes: list[Outcome]

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.summary is not None]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.summary is None]

    @property
    def final(self) -> float | None:
        """Mean final val loss; None unless every seed finished (a partial mean would flatter it)."""
        if self.failed or not self.ok:
            return None
        return statistics.fmean(o.summary["val_loss"] for o in self.ok)

    @property
    def spread(self) -> float | None:
        finals = [o.summary["val_loss"] for o in self.ok]
        return statistics.stdev(finals) if len(finals) > 1 and not self.failed else None


def group_results(outcomes: Sequence[Outcome]) -> list[ConfigResult]:
    groups: dict[str, ConfigResult] = {}
    for o in outcomes:
        spec = o.job.spec
        if spec.name not in groups:
            lr = spec.params.get("lr")  # (AdamW's sweep; SinkGD's when --sinkgd-lrs is given)
            groups[spec.name] = ConfigResult(spec.name, spec.family, lr, [], [])
        groups[spec.name].seeds.append(spec.seed)
        groups[spec.name].outcomes.append(o)
    return list(groups.values())


def choose_baseline(results: Sequence[ConfigResult]) -> ConfigResult | None:
    """The AdamW lr with the lowest (seed-mean) final val loss; failed configurations cannot be it."""
    candidates = [r for r in results if r.family == "adamw" and r.final is not None]
    return min(candidates, key=lambda r: r.final) if candidates else None


def sweep_edge_note(results: Sequence[ConfigResult], baseline: ConfigResult | None) -> str | None:
    """A baseline at the edge of the lr grid may be undertuned; a fair comparison needs its optimum inside."""
    lrs = sorted(r.lr for r in results if r.family == "adamw" and r.lr is not None)
    if baseline is None or len(lrs) < 2 or lrs[0] < baseline.lr < lrs[-1]:
        return None
    side = "largest" if baseline.lr == lrs[-1] else "smallest"
    return (f"the best AdamW lr ({baseline.lr:g}) is the {side} one swept: the baseline may be undertuned; "
            "extend --adamw-lrs past it")


def result_rows(results: Sequence[ConfigResult], baseline: ConfigResult | None,
                tokens_per_step: int) -> list[dict[str, Any]]:
    """Everything the table, the JSON and the plot show, per configuration."""
    target = baseline.final if baseline else None
    base_tokens = None
    rows = []
    for r in results:
        curve = [(s * tokens_per_step, v) for s, v in mean_curve([o.summary["val"] for o in r.ok])] if r.ok else []
        reach = tokens_to_target(curve, target) if target is not None and r.final is not None else None
        if r is baseline:
            base_tokens = reach
        mem = [memory_use(o.summary) for o in r.ok]
        rows.append({
            "name": r.name, "family": r.family, "lr": r.lr, "seeds": r.seeds, "baseline": r is baseline,
            "status": ("not run" if all(o.status == "not run" for o in r.outcomes) else "failed") if r.failed
            else "ok", "failed_seeds": len(r.failed),
            "optimizer": r.ok[0].summary.get("optimizer") if r.ok else None,
            "final_val_loss": r.final, "final_val_loss_std": r.spread,
            "final_val_ppl": math.exp(min(r.final, 50.0)) if r.final is not None else None,
            "tokens_to_target": reach, "curve": [[t, v] for t, v in curve],
            "tokens_per_s": statistics.fmean(o.summary["tokens_per_s"] for o in r.ok) if r.ok else None,
            "memory_per_rank": max((m[0] for m in mem if m[0] is not None), default=None),
            "optimizer_state_per_rank": max((m[1] for m in mem if m[1] is not None), default=None),
            "memory_kind": mem[0][2] if mem else None,
            "wall_seconds": statistics.fmean(o.wall_seconds for o in r.outcomes),
            "per_seed": [seed_row(o, target, tokens_per_step) for o in r.outcomes],
        })
    for row in rows:
        reach = row["tokens_to_target"]
        row["tokens_ratio"] = reach / base_tokens if reach is not None and base_tokens else None
    return rows


def seed_row(o: Outcome, target: float | None, tokens_per_step: int) -> dict[str, Any]:
    row = {"seed": o.job.spec.seed, "run_dir": str(o.job.run_dir), "status": o.status, "wall_seconds": o.wall_seconds}
    if o.summary is None:
        return {**row, "returncode": o.returncode, "log_tail": o.log_tail}
    curve = [(s * tokens_per_step, v) for s, v in o.summary["val"]]
    return {**row, "final_val_loss": o.summary["val_loss"], "tokens_per_s": o.summary["tokens_per_s"],
            "tokens_to_target": tokens_to_target(curve, target) if target is not None else None,
            "val": o.summary["val"]}


TRAIN_WINDOW = 50  # steps averaged for the final train loss (one step's loss is noisy)


def final_train_loss(summary: dict[str, Any], window: int = TRAIN_WINDOW) -> float | None:
    losses = [x for x in summary.get("losses") or [] if x is not None and math.isfinite(x)]
    return statistics.fmean(losses[-window:]) if losses else None


def crossings(curve: Sequence[tuple[float, float]], reference: Sequence[tuple[float, float]]) -> list[float]:
    """Token counts where ``curve`` and ``reference`` (same eval points) change order, linearly interpolated
    between the eval points on each side of the change."""
    ref = dict(reference)
    diffs = [(t, v - ref[t]) for t, v in curve if t in ref]
    out = []
    for (t0, d0), (t1, d1) in zip(diffs, diffs[1:]):
        if d0 == 0.0 or (d0 < 0.0) != (d1 < 0.0):
            out.append(float(t0) if d0 == 0.0 else t0 + d0 / (d0 - d1) * (t1 - t0))
    return out


def horizon_rows(rows: Sequence[dict[str, Any]], outcomes: Sequence[Outcome], train_tokens: int | None,
                 tokens_per_step: int) -> list[dict[str, Any]]:
    """Per configuration: final train loss beside val loss (the generalisation gap), the epochs of the training
    split the run saw, and against the baseline: the final gap and where the val curves cross."""
    base = next((r for r in rows if r["baseline"]), None)
    out = []
    for row in rows:
        ok = [o for o in outcomes if o.job.spec.name == row["name"] and o.summary is not None]
        train = [x for x in (final_train_loss(o.summary) for o in ok) if x is not None]
        train_loss = statistics.fmean(train) if train and row["status"] == "ok" else None
        tokens = statistics.fmean(o.summary.get("tokens_total") or o.summary["step"] * tokens_per_step for o in ok) \
            if ok else None
        val = row["final_val_loss"]
        out.append({
            "name": row["name"], "family": row["family"], "lr": row["lr"], "final_val_loss": val,
            "final_train_loss": train_loss, "gap": val - train_loss if val is not None and train_loss else None,
            "tokens": tokens, "epochs": tokens / train_tokens if tokens and train_tokens else None,
            "vs_baseline": val - base["final_val_loss"] if base and val is not None else None,
            "crossings": crossings(row["curve"], base["curve"]) if base and row["curve"] and not row["baseline"]
            else [],
        })
    return out


HORIZON_HEADER = ("| run | final val loss | final train loss | val − train | final val − baseline's | val curves cross "
                  "the baseline's at (tokens) | epochs of the train split |")


def render_horizon(hrows: Sequence[dict[str, Any]], window: int = TRAIN_WINDOW) -> str:
    def num(x: float | None, fmt: str) -> str:
        return "–" if x is None else format(x, fmt)

    lines = ["", f"Generalisation and crossings (train loss: the mean of the last {window} steps' training loss; "
             "\"cross\": where a run's val curve and the baseline's change order, interpolated between evals):", "",
             HORIZON_HEADER, "|" + "---|" * (HORIZON_HEADER.count("|") - 1)]
    for h in hrows:
        cross = ", ".join(f"{t:,.0f}" for t in h["crossings"]) or "never"
        lines.append(f"| {h['name']} | {num(h['final_val_loss'], '.4f')} | {num(h['final_train_loss'], '.4f')} | "
                     f"{num(h['gap'], '+.4f')} | {num(h['vs_baseline'], '+.4f')} | {cross} | "
                     f"{num(h['epochs'], '.2f')} |")
    return "\n".join(lines) + "\n"


def plot_lr_sensitivity(path: Path, hrows: Sequence[dict[str, Any]], title: str) -> Path | None:
    """Final val loss against lr, one line per optimizer family that was swept over two or more lrs."""
    families: dict[str, list[tuple[float, float]]] = {}
    for h in hrows:
        if h["lr"] is not None and h["final_val_loss"] is not None:
            families.setdefault(h["family"], []).append((h["lr"], h["final_val_loss"]))
    families = {f: sorted(v) for f, v in families.items() if len(v) >= 2}
    if not families:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for family, points in families.items():
        lrs, losses = zip(*points)
        ax.plot(lrs, losses, "o-", label=family)
    ax.set_xscale("log")
    ax.set_xlabel("lr (SinkGD: matrices step with lr × lr_scale)")
    ax.set_ylabel("final val loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def train_split_tokens(run_config: dict[str, Any]) -> int | None:
    """Tokens in the training split the runs drew from (from the data cache the runs built)."""
    d = run_config["data"]
    try:
        from launch.data import load_tokens

        return len(load_tokens(d["source"], d["vocab_size"], d["val_fraction"], d["tokenizer"], d["text_column"]).train)
    except Exception:  # noqa: BLE001 - a report without epochs beats no report
        return None


def ranks(world: int) -> str:
    return f"{world} rank" + ("s" if world != 1 else "")


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def fmt_tokens(n: float | None) -> str:
    return "not reached" if n is None else f"{n:,.0f}"


TABLE_HEADER = ("| run | final val loss | perplexity | tokens to baseline loss | × baseline | tokens/s "
                "| memory/rank | optimizer state/rank | wall time |")


def table_row(row: dict[str, Any], has_baseline: bool) -> str:
    name = f"**{row['name']}** (baseline)" if row["baseline"] else row["name"]
    wall = fmt_seconds(row["wall_seconds"])
    if row["status"] == "not run":
        return f"| {name} | not run yet | | | | | | | |"
    if row["status"] == "failed":
        return f"| {name} | failed ({row['failed_seeds']}/{len(row['seeds'])} seeds) | | | | | | | {wall} |"
    loss = f"{row['final_val_loss']:.4f}"
    if row["final_val_loss_std"] is not None:
        loss += f" ± {row['final_val_loss_std']:.4f}"
    reach = fmt_tokens(row["tokens_to_target"]) if has_baseline else "–"
    ratio = f"{row['tokens_ratio']:.2f}" if row["tokens_ratio"] is not None else "–"
    memory = fmt_bytes(row["memory_per_rank"])
    if row["memory_kind"] != ACCOUNTED:
        memory += f" ({row['memory_kind']})"
    return (f"| {name} | {loss} | {row['final_val_ppl']:.2f} | {reach} | {ratio} | {row['tokens_per_s']:,.0f} | "
            f"{memory} | {fmt_bytes(row['optimizer_state_per_rank'])} | {wall} |")


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table: one row per configuration, the baseline in bold."""
    has_baseline = any(r["baseline"] for r in rows)
    columns = TABLE_HEADER.count("|") - 1
    return "\n".join([TABLE_HEADER, "|" + "---|" * columns] + [table_row(r, has_baseline) for r in rows])


def describe_settings(opts: Options, jobs: Sequence[Job]) -> dict[str, Any]:
    job = jobs[0]  # the runs differ in optimizer and seed only
    t = job.run_config["train"]
    return {"model": opts.model, "zero_stage": opts.stage, "world": opts.world, "steps": t["steps"],
            "batch_size": t["batch_size"], "seq_len": t["seq_len"], "tokens_per_step": t["batch_size"] * t["seq_len"],
            "eval_every": job.run_config["eval"]["every"], "eval_sequences": job.run_config["eval"]["sequences"],
            "seeds": sorted({j.spec.seed for j in jobs}),
            "overrides": job.overrides[:-1], "launcher": str(LAUNCHER.relative_to(ROOT))}


def render_markdown(settings: dict[str, Any], rows: Sequence[dict[str, Any]], notes: Sequence[str]) -> str:
    base = next((r for r in rows if r["baseline"]), None)
    seeds = settings["seeds"]
    head = [
        f"# Optimizer comparison: {settings['model']}, ZeRO-{settings['zero_stage']}, {ranks(settings['world'])}",
        "",
        f"{settings['steps']} steps x {settings['tokens_per_step']:,} tokens, val every {settings['eval_every']} "
        f"steps on {settings['eval_sequences']} sequences, seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))}.",
        "",
        (f"Baseline: **{base['name']}** (the AdamW lr with the lowest final val loss), final val loss "
         f"{base['final_val_loss']:.4f}. \"tokens to baseline loss\": the first point where the run's val curve "
         "reaches it, linearly interpolated between evals; \"× baseline\": those tokens over the baseline's "
         "(below 1: fewer tokens than AdamW)." if base else "No baseline: no AdamW run of this sweep finished "
         "(it needs adamw in --optimizers)."),
    ]
    if len(seeds) > 1:
        head += ["", "Over seeds: mean ± sample standard deviation of the final val loss; tokens to baseline loss "
                 "on the seed-mean val curve; tokens/s and wall time the mean per seed; memory the max."]
    head += ["", "Memory: max over ranks; accounted tensor bytes when the run reports them, else the peak memory "
             "of the kind named."]
    return "\n".join(head + [""] + [render_table(rows)] + [""] + [f"Note: {n}" for n in notes]).rstrip() + "\n"


def seed_band(row: dict[str, Any], tokens_per_step: int) -> tuple[list[int], list[float], list[float]] | None:
    """(tokens, min, max) over a configuration's seeds on their common eval steps; None for a single seed."""
    curves = [dict((s, v) for s, v in seed["val"]) for seed in row["per_seed"] if "val" in seed]
    if len(curves) < 2:
        return None
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return ([s * tokens_per_step for s in steps], [min(c[s] for c in curves) for s in steps],
            [max(c[s] for c in curves) for s in steps])


def plot_curves(path: Path, rows: Sequence[dict[str, Any]], title: str, target: float | None,
                tokens_per_step: int) -> Path:
    """Val loss against tokens, one line per configuration (seed mean, min-max band over seeds), the baseline
    thick and black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        if not row["curve"]:
            continue
        tokens, losses = zip(*row["curve"])
        if row["baseline"]:
            ax.plot(tokens, losses, "o-", color="black", lw=2.5, label=f"{row['name']} (baseline)", zorder=3)
        elif row["family"] == "adamw":
            ax.plot(tokens, losses, ".--", lw=1, alpha=0.6, label=row["name"])
        else:
            ax.plot(tokens, losses, "o-", lw=1.5, label=row["name"])
        band = seed_band(row, tokens_per_step)
        if band:
            ax.fill_between(*band, color=ax.get_lines()[-1].get_color(), alpha=0.15, lw=0)
    if target is not None:
        ax.axhline(target, color="black", ls=":", lw=1, label="baseline final val loss")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(opts: Options, jobs: Sequence[Job], outcomes: Sequence[Outcome]) -> tuple[str, list[Path]]:
    """compare.md, compare.json and compare.png in --out; returns the Markdown (printed at the end)."""
    settings = describe_settings(opts, jobs)
    results = group_results(outcomes)
    baseline = choose_baseline(results)
    rows = result_rows(results, baseline, settings["tokens_per_step"])
    notes = [n for n in [sweep_edge_note(results, baseline)] if n]
    hrows = horizon_rows(rows, outcomes, train_split_tokens(jobs[0].run_config), settings["tokens_per_step"])
    markdown = render_markdown(settings, rows, notes) + render_horizon(hrows)
    opts.out.mkdir(parents=True, exist_ok=True)
    paths = [opts.out / "compare.md", opts.out / "compare.json", opts.out / "compare.png"]
    paths[0].write_text(markdown)
    paths[1].write_text(json.dumps({"settings": settings, "baseline": baseline.name if baseline else None,
                                    "target_val_loss": baseline.final if baseline else None, "notes": notes,
                                    "runs": rows, "horizon": hrows}, indent=1))
    title = f"{settings['model']}, ZeRO-{opts.stage}, {ranks(opts.world)}, {settings['steps']} steps"
    plot_curves(paths[2], rows, title, baseline.final if baseline else None, settings["tokens_per_step"])
    lr_plot = plot_lr_sensitivity(opts.out / "compare_lr.png", hrows, f"final val loss vs lr ({title})")
    return markdown, paths + ([lr_plot] if lr_plot else [])


# ---------------------------------------------------------------------- main
def print_plan(jobs: Sequence[Job], opts: Options) -> None:
    model = model_arg(opts.model)
    for job in jobs:
        decision = decide(job.run_dir, job.identity, opts.overwrite)
        cmd = launch_command(job, model, decision == "resume")
        print(f"{job.spec.run_name}: {decision}\n  NPROC={job.world} {' '.join(cmd)}")


def raise_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        opts = validate_options(build_parser().parse_args(argv))
        jobs = build_jobs(opts)
        preflight(jobs)
    except (OptionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if opts.dry_run:
        print_plan(jobs, opts)
        return 0
    print(f"compare: {len(jobs)} runs of {opts.model}, ZeRO-{opts.stage}, {ranks(opts.world)}, "
          f"{jobs[0].steps} steps each, into {opts.out}", flush=True)
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        outcomes = run_sweep(jobs, opts, Progress(len(jobs)))
    except KeyboardInterrupt:
        print("\ninterrupted: the current run saved a checkpoint; run the same command again to resume",
              file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    markdown, paths = write_reports(opts, jobs, outcomes)
    print("\n" + markdown + "\n" + "\n".join(f"wrote {p}" for p in paths), flush=True)
    failed = [o.job.spec.run_name for o in outcomes if o.summary is None and o.status != "not run"]
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (logs in their run directories)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""launch/compare.py (``make compare``): the pure parts against hand-computed numbers, then one small sweep
through the real launcher: reports written, a failing run reported while the others finish, and a second
invocation that reuses the finished runs instead of training again."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from launch import compare
from launch.compare import (
    ACCOUNTED,
    ConfigResult,
    Job,
    OptionError,
    Outcome,
    RunSpec,
    build_parser,
    choose_baseline,
    decide,
    group_results,
    mean_curve,
    memory_use,
    render_table,
    result_rows,
    sweep_edge_note,
    tokens_to_target,
    validate_options,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------------- tokens to the baseline's loss
def test_tokens_to_target_interpolates_linearly_between_evals():
    curve = [(100, 5.0), (200, 4.0), (300, 3.5)]
    assert tokens_to_target(curve, 4.5) == pytest.approx(150.0)  # half way from 5.0 to 4.0
    assert tokens_to_target(curve, 3.75) == pytest.approx(250.0)
    assert tokens_to_target(curve, 4.0) == pytest.approx(200.0)  # exactly on a point
    assert tokens_to_target(curve, 3.5) == pytest.approx(300.0)  # the baseline reaches its own final loss
    assert tokens_to_target(curve, 6.0) == 100.0  # already there at the first eval: nothing is known before it
    assert tokens_to_target(curve, 3.4) is None  # never reached


def test_tokens_to_target_takes_the_first_crossing():
    curve = [(1, 5.0), (2, 4.0), (3, 4.5), (4, 3.9)]
    assert tokens_to_target(curve, 4.2) == pytest.approx(1.8)  # 1 + (5.0 - 4.2) / (5.0 - 4.0)
    assert tokens_to_target(curve, 3.95) == pytest.approx(3 + (4.5 - 3.95) / (4.5 - 3.9))


def test_mean_curve_over_seeds_uses_the_common_steps():
    assert mean_curve([[(10, 5.0), (20, 4.0)], [(10, 6.0), (20, 4.5), (30, 4.0)]]) == [(10, 5.5), (20, 4.25)]


def test_memory_prefers_the_accounted_bytes_and_falls_back_to_the_peak():
    accounted = {"memory": {"per_rank": [
        {"weights": 10, "gradients": 10, "master_weights": 0, "optimizer_state_matrices": 0,
         "optimizer_state_adamw": 40, "total": 60},
        {"weights": 10, "gradients": 10, "master_weights": 0, "optimizer_state_matrices": 5,
         "optimizer_state_adamw": 30, "total": 55}]}, "peak_memory_bytes": [999, 999]}
    assert memory_use(accounted) == (60, 40, ACCOUNTED)  # max over ranks of total and of matrices + adamw state
    assert memory_use({"peak_memory_bytes": [700, 720], "memory_kind": "CPU peak RSS"}) == (720, None, "CPU peak RSS")


# ---------------------------------------------------------------------- baseline, rows, table (fake runs)
def fake_outcome(name: str, family: str, val: list[tuple[int, float]] | None, seed: int = 0,
                 lr: float | None = None, **summary_extra) -> Outcome:
    spec = RunSpec(name, family, {"lr": lr} if lr is not None else {}, seed)
    job = Job(spec, Path("/runs") / spec.run_name, [], {"train": {"steps": 20}}, {}, 2)
    if val is None:
        return Outcome(job, "failed", None, 30.0, 1, "Traceback ...\nValueError: Invalid learning rate: -1.0")
    summary = {"val": [list(v) for v in val], "val_loss": val[-1][1], "tokens_per_s": 2000.0,
               "peak_memory_bytes": [700 * 2**20, 710 * 2**20], "memory_kind": "CPU peak RSS",
               "optimizer": family, **summary_extra}
    return Outcome(job, "done", summary, 60.0, 0)


def sweep_outcomes() -> list[Outcome]:
    per_rank = [{"total": 3 * 2**20, "optimizer_state_matrices": 0, "optimizer_state_adamw": 2**20}]
    return [
        fake_outcome("adamw-lr0.001", "adamw", [(10, 5.5), (20, 4.5)], lr=1e-3),
        fake_outcome("adamw-lr0.002", "adamw", [(10, 5.0), (20, 4.0)], lr=2e-3),
        fake_outcome("adamw-lr0.004", "adamw", None, lr=4e-3),  # failed: cannot be the baseline
        fake_outcome("sinkgd-l5", "sinkgd-l5", [(10, 4.5), (20, 3.5)], memory={"per_rank": per_rank}),
    ]


def test_baseline_is_the_best_finished_adamw_lr():
    results = group_results(sweep_outcomes())
    assert choose_baseline(results).name == "adamw-lr0.002"  # sinkgd-l5 is lower, but it is not AdamW
    assert choose_baseline([r for r in results if r.family != "adamw"]) is None
    assert choose_baseline([]) is None


def test_sweep_edge_note_when_the_best_lr_is_at_an_end_of_the_grid():
    results = group_results(sweep_outcomes())
    baseline = choose_baseline(results)  # 0.002 is inside [0.001, 0.004]
    assert sweep_edge_note(results, baseline) is None
    two = [r for r in results if r.lr != 4e-3]
    assert "largest one swept" in sweep_edge_note(two, choose_baseline(two))


def test_rows_and_table_against_hand_computed_numbers():
    results = group_results(sweep_outcomes())
    rows = result_rows(results, choose_baseline(results), tokens_per_step=1000)
    by_name = {r["name"]: r for r in rows}
    # target 4.0 = the baseline's final loss, reached by the baseline itself at step 20 = 20,000 tokens;
    # sinkgd-l5 crosses it half way between step 10 (4.5) and step 20 (3.5): step 15 = 15,000 tokens, ratio 0.75
    assert by_name["adamw-lr0.002"]["tokens_to_target"] == pytest.approx(20_000)
    assert by_name["sinkgd-l5"]["tokens_to_target"] == pytest.approx(15_000)
    assert by_name["sinkgd-l5"]["tokens_ratio"] == pytest.approx(0.75)
    assert by_name["adamw-lr0.001"]["tokens_to_target"] is None
    assert by_name["sinkgd-l5"]["final_val_ppl"] == pytest.approx(math.exp(3.5))
    assert render_table(rows).splitlines() == [
        compare.TABLE_HEADER,
        "|---|---|---|---|---|---|---|---|---|",
        "| adamw-lr0.001 | 4.5000 | 90.02 | not reached | – | 2,000 | 710.0 MiB (CPU peak RSS) | n/a | 1m00s |",
        "| **adamw-lr0.002** (baseline) | 4.0000 | 54.60 | 20,000 | 1.00 | 2,000 | 710.0 MiB (CPU peak RSS) | n/a "
        "| 1m00s |",
        "| adamw-lr0.004 | failed (1/1 seeds) | | | | | | | 30s |",
        "| sinkgd-l5 | 3.5000 | 33.12 | 15,000 | 0.75 | 2,000 | 3.0 MiB | 1.0 MiB | 1m00s |",
    ]


def test_several_seeds_give_mean_and_spread():
    outcomes = [fake_outcome("adamw-lr0.002", "adamw", [(10, 5.0), (20, 4.0)], seed=0, lr=2e-3),
                fake_outcome("adamw-lr0.002", "adamw", [(10, 5.2), (20, 4.2)], seed=1, lr=2e-3),
                fake_outcome("scale", "scale", [(10, 4.0), (20, 3.8)], seed=0),
                fake_outcome("scale", "scale", [(10, 4.4), (20, 3.6)], seed=1)]
    results = group_results(outcomes)
    assert [r.seeds for r in results] == [[0, 1], [0, 1]]
    assert results[0].final == pytest.approx(4.1) and results[0].spread == pytest.approx(math.sqrt(0.02))
    rows = result_rows(results, choose_baseline(results), tokens_per_step=100)
    # scale's seed-mean curve is 4.2 at step 10, 3.7 at step 20: it reaches 4.1 at step 12 = 1,200 tokens
    assert rows[1]["tokens_to_target"] == pytest.approx(1200) and rows[1]["tokens_ratio"] == pytest.approx(0.6)
    assert "4.1000 ± 0.1414" in render_table(rows)


def test_a_partly_failed_configuration_has_no_mean():
    r = ConfigResult("scale", "scale", None, [0, 1], [fake_outcome("scale", "scale", [(10, 4.0)]),
                                                      fake_outcome("scale", "scale", None, seed=1)])
    assert r.final is None and r.spread is None and len(r.failed) == 1


# ---------------------------------------------------------------------- reuse / resume / restart
def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_decide_reuses_resumes_or_restarts(tmp_path):
    identity = {"run_config": {"train": {"steps": 20, "betas": (0.9, 0.999)}}, "ds_config": {}, "world": 2}
    done = {"step": 20, "steps": 20, "stopped_by": None, "val": [[20, 4.0]]}
    run = tmp_path / "run"
    assert decide(run, identity, overwrite=False) == "fresh"  # nothing there
    write(run / compare.RECORD, {"identity": compare.normalise(identity)})
    assert decide(run, identity, overwrite=False) == "fresh"  # started, but no checkpoint yet
    write(run / "summary.json", {**done, "step": 12, "stopped_by": "SIGTERM"})
    write(run / "checkpoints" / "latest", {})
    assert decide(run, identity, overwrite=False) == "resume"  # interrupted after a checkpoint
    write(run / "summary.json", done)
    assert decide(run, identity, overwrite=False) == "reuse"  # finished with these settings
    assert decide(run, identity, overwrite=True) == "fresh"
    other = {**identity, "world": 1}
    assert decide(run, other, overwrite=False) == "fresh"  # finished, but with other settings


# ---------------------------------------------------------------------- options
def options(*argv: str):
    return validate_options(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("argv, message", [
    (["--stage", "4"], r"--stage='4' must be one of 1, 2, 3"),
    (["--world", "0"], r"--world='0' must be an integer >= 1"),
    (["--steps", "ten"], r"--steps='ten' must be an integer >= 1"),
    (["--eval-every", "0"], r"--eval-every='0' must be an integer >= 1"),
    (["--optimizers", "adamw", "sinkgd"], r"--optimizers 'sinkgd' is not known\. Did you mean 'sinkgd-l5'\? "
                                          r"Allowed: adamw, sinkgd-l5, sinkgd-l1, scale, swan"),
    (["--optimizers", "swan,swan"], r"--optimizers: swan given more than once"),
    (["--adamw-lrs", "1e-3", "fast"], r"--adamw-lrs 'fast' is not a number; allowed: numbers in \(0, 1\]"),
    (["--adamw-lrs", "0"], r"--adamw-lrs '0' must be in \(0, 1\]"),
    (["--optimizers", "scale", "--adamw-lrs", "1e-3"], r"--adamw-lrs is given but adamw is not in --optimizers"),
    (["--seeds", "0", "-1"], r"--seeds='-1' must be an integer >= 0"),
    (["--seeds", "1", "1"], r"--seeds: 1 given more than once"),
    (["--set", "train.seed=3"], r"--set 'train.seed=3': use --seeds"),
    (["--sinkgd-lrs", "0.02", "--optimizers", "adamw"], r"--sinkgd-lrs is given but neither sinkgd-l5 nor sinkgd-l1"),
    (["--sinkgd-lrs", "0.02", "0", "--optimizers", "sinkgd-l5"], r"--sinkgd-lrs '0' must be in \(0, 1\]"),
    (["--sinkgd-lrs", "0.02", "2e-2"], r"--sinkgd-lrs: 0.02 given more than once"),
    (["--model", "tiyn"], r"--model 'tiyn' is not a known model config\. Did you mean 'tiny'\?"),
])
def test_bad_options_name_the_option_the_value_and_what_is_allowed(argv, message):
    with pytest.raises(OptionError, match=message):
        options(*argv)


def test_bad_run_settings_are_refused_before_any_run(tmp_path, capsys):
    assert compare.main(["--world", "3", "--out", str(tmp_path)]) == 2  # batch 8 = micro 4 x 3 ranks x ?
    err = capsys.readouterr().err
    assert "error: run adamw-lr0.001-seed0: train.batch_size=8 is not divisible by" in err and "world size 3" in err
    assert compare.main(["--set", "train.stpes=5", "--out", str(tmp_path)]) == 2
    assert "unknown key train.stpes (value 5). Did you mean 'steps'?" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing was started


def test_options_and_plan():
    opts = options("--optimizers", "adamw,sinkgd-l1", "--adamw-lrs", "2e-3", "1e-3", "--seeds", "1", "0",
                   "--steps", "40", "--eval-every", "10", "--set", "eval.sequences=8")
    specs = compare.plan_specs(opts, default_seed=0)
    assert [s.run_name for s in specs] == ["adamw-lr0.002-seed0", "adamw-lr0.002-seed1", "adamw-lr0.001-seed0",
                                           "adamw-lr0.001-seed1", "sinkgd-l1-seed0", "sinkgd-l1-seed1"]
    assert compare.run_overrides(opts, 1) == ["checkpoint.keep=1", "eval.sequences=8", "train.steps=40",
                                              "eval.every=10", "train.seed=1"]
    repo = json.loads((ROOT / "configs" / "zero2_sinkgd.json").read_text())
    derived = compare.derive_ds_config(2, specs[-1])
    assert derived["optimizer"]["params"] == {**repo["optimizer"]["params"], "sinkhorn_iters": 1}
    assert {k: v for k, v in derived.items() if k != "optimizer"} == {k: v for k, v in repo.items() if k != "optimizer"}
    assert options().optimizers == ["adamw", "sinkgd-l5", "sinkgd-l1", "scale", "swan"]
    assert options().adamw_lrs == [1e-3, 2e-3, 4e-3, 8e-3]


def test_sinkgd_lr_sweep_names_each_lr_and_changes_only_the_lr():
    opts = options("--optimizers", "sinkgd-l5", "scale", "--sinkgd-lrs", "0.01", "0.04", "--seeds", "0")
    specs = compare.plan_specs(opts, default_seed=0)
    assert [s.run_name for s in specs] == ["sinkgd-l5-lr0.01-seed0", "sinkgd-l5-lr0.04-seed0", "scale-seed0"]
    repo = json.loads((ROOT / "configs" / "zero2_sinkgd.json").read_text())["optimizer"]["params"]
    assert compare.derive_ds_config(2, specs[1])["optimizer"]["params"] == {**repo, "sinkhorn_iters": 5, "lr": 0.04}
    assert [s.run_name for s in compare.plan_specs(options("--optimizers", "sinkgd-l5"), 0)] == ["sinkgd-l5-seed0"]


# ---------------------------------------------------------------------- one small sweep, end to end
SMALL = ["--optimizers", "adamw", "scale", "--adamw-lrs", "2e-3", "--world", "1", "--steps", "4",
         "--eval-every", "2", "--set", "eval.sequences=4", "--set", "train.batch_size=4", "--set", "train.seq_len=64"]


def test_small_sweep_reports_a_failure_then_reuses_finished_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    plan = compare.plan_specs

    def with_a_broken_run(opts, default_seed):  # an lr torch's AdamW refuses, past compare's own checks
        return [RunSpec("adamw-broken", "adamw", {"lr": -1.0}, default_seed)] + plan(opts, default_seed)

    monkeypatch.setattr(compare, "plan_specs", with_a_broken_run)
    assert compare.main([*SMALL, "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "[1/3] adamw-broken-seed0: FAILED (exit code" in printed and "Invalid learning rate" in printed
    assert "[3/3] scale-seed0: done, val loss" in printed  # the sweep went on after the failure
    report = json.loads((out / "compare.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert runs["adamw-broken"]["status"] == "failed"
    assert "Invalid learning rate" in runs["adamw-broken"]["per_seed"][0]["log_tail"]
    assert report["baseline"] == "adamw-lr0.002" and runs["adamw-lr0.002"]["tokens_ratio"] == 1.0
    assert report["target_val_loss"] == runs["adamw-lr0.002"]["final_val_loss"] < math.log(4096)  # it learned
    assert [s for s, _ in runs["scale"]["per_seed"][0]["val"]] == [2, 4]
    assert runs["scale"]["curve"][-1][0] == 4 * 4 * 64  # tokens = step x batch x seq_len
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "compare.md").read_text()
    assert "**adamw-lr0.002** (baseline)" in table and "| adamw-broken | failed (1/1 seeds) |" in table
    ds = json.loads((out / "scale-seed0" / "ds_config.json").read_text())
    assert ds["optimizer"]["type"] == "SCALE" and ds["zero_optimization"]["stage"] == 2
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*-seed0/summary.json")}
    assert len(finished) == 2

    monkeypatch.setattr(compare, "plan_specs", plan)

    def no_training(*_args, **_kwargs):
        raise AssertionError("a finished run was launched again")

    monkeypatch.setattr(compare, "run_child", no_training)
    assert compare.main([*SMALL, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1/2] adamw-lr0.002-seed0: reused" in printed and "[2/2] scale-seed0: reused" in printed
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert "adamw-broken" not in (out / "compare.md").read_text()


# ---------------------------------------------------------------------- the horizon details (issue 29)
def test_crossings_are_interpolated_where_the_order_changes():
    base = [(100, 5.0), (200, 4.0), (300, 3.5), (400, 3.2)]
    run = [(100, 4.8), (200, 4.1), (300, 3.6), (400, 3.1)]  # ahead, behind (cross in (100, 200)), ahead again
    got = compare.crossings(run, base)
    # d = -0.2 at 100, +0.1 at 200: 100 + 0.2/0.3*100; d = +0.1 at 300, -0.1 at 400: 350
    assert got == [pytest.approx(100 + 200 / 3), pytest.approx(350.0)]
    assert compare.crossings(base, base)[:1] == [100.0]  # equal counts as a crossing point
    assert compare.crossings([(1, 1.0), (2, 0.5)], [(1, 2.0), (2, 1.0)]) == []


def test_horizon_rows_train_loss_gap_epochs_and_crossings():
    outcomes = [
        fake_outcome("adamw-lr0.002", "adamw", [(10, 5.0), (20, 4.0)], lr=2e-3, losses=[9.0] * 60 + [3.0] * 50,
                     tokens_total=20_000),
        fake_outcome("sinkgd-l5-lr0.02", "sinkgd-l5", [(10, 4.5), (20, 4.2)], lr=0.02, losses=[2.0, 3.6],
                     tokens_total=20_000),
    ]
    results = group_results(outcomes)
    rows = result_rows(results, choose_baseline(results), tokens_per_step=1000)
    h = {r["name"]: r for r in compare.horizon_rows(rows, outcomes, train_tokens=8_000, tokens_per_step=1000)}
    assert h["adamw-lr0.002"]["final_train_loss"] == pytest.approx(3.0)  # the last 50 steps only
    assert h["adamw-lr0.002"]["gap"] == pytest.approx(1.0) and h["adamw-lr0.002"]["epochs"] == pytest.approx(2.5)
    assert h["sinkgd-l5-lr0.02"]["final_train_loss"] == pytest.approx(2.8)
    assert h["sinkgd-l5-lr0.02"]["vs_baseline"] == pytest.approx(0.2)
    # ahead by 0.5 at 10,000 tokens, behind by 0.2 at 20,000: the curves cross at 10,000 + 0.5/0.7 * 10,000
    assert h["sinkgd-l5-lr0.02"]["crossings"] == [pytest.approx(10_000 + 50_000 / 7)]
    assert h["sinkgd-l5-lr0.02"]["lr"] == 0.02
    table = compare.render_horizon(list(h.values()))
    assert "| sinkgd-l5-lr0.02 | 4.2000 | 2.8000 | +1.4000 | +0.2000 | 17,143 | 2.50 |" in table


def test_report_only_reports_finished_runs_and_starts_none(tmp_path, capsys):
    argv = ["--optimizers", "adamw", "--adamw-lrs", "2e-3", "--steps", "4", "--eval-every", "2", "--out", str(tmp_path),
            "--report-only"]
    assert compare.main(argv) == 0
    out = capsys.readouterr().out
    assert "adamw-lr0.002-seed0: not run yet (--report-only)" in out
    assert "| adamw-lr0.002 | not run yet | | | | | | | |" in out
    assert not (tmp_path / "adamw-lr0.002-seed0").exists()  # nothing was started

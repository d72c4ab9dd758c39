"""``bench/full_network_study.py``: the plan, resuming an unfinished run, carried results, a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from dataclasses import replace
from types import ModuleType

import pytest
from conftest import CIFAR10_DIR, REPO_ROOT

REQUIRED = {"method", "kl_coef", "kl_loss", "seed", "epochs", "train_samples", "depth", "full_top1"}
REQUIRED |= {"subnet_top1_recalibrated", "collapsed", "curve_eval_top1"}


def load_study() -> ModuleType:
    """The benchmark script as a module."""
    spec = importlib.util.spec_from_file_location("full_network_study", REPO_ROOT / "bench" / "full_network_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_plans_run_seed_by_seed_and_each_setting_becomes_its_overrides():
    study = load_study()
    runs = study.plan_runs("cpu")
    main = [run for run in runs if run.setting.kl_loss == "kl_direction" or run.setting.method == "ct"]
    assert runs[: len(main)] == main and len(main) == 12  # CT and KL- first, plain KL after them
    plain = runs[len(main) :]  # lambda 5 (the 5k recipe), then lambda 2 (the full plan's pick), seed by seed
    assert [(run.setting.kl_loss, run.setting.kl_coef, run.seed) for run in plain] == [
        ("kl", lam, s) for s in (1, 2, 3) for lam in (5, 2)
    ]
    assert [run.seed for run in main] == sorted(run.seed for run in main)  # a study cut short stays balanced
    assert len({run.name for run in runs}) == len(runs)
    assert {run.epochs for run in runs} == {100} and {run.depth for run in runs} == {20}
    # Every ST setting names its lambda, KL and introduction: a recipe that changes them changes no run.
    setting = study.Setting("stpp", 5, kl_loss="kl", intro="start3")
    assert setting.overrides() == [
        "--kl_coef", "5", "--kl_loss", "kl", "--kl_coef_schedule", "constant", "--stim_start_epoch", "3",
    ]  # fmt: skip
    assert study.Setting("stpp", 5, intro="cosine_up").overrides()[-4:] == [
        "--kl_coef_schedule", "cosine_up", "--stim_start_epoch", "0",
    ]  # fmt: skip
    warm = study.Setting("stpp", 5, intro="warmup0.1")
    assert warm.overrides()[-4:] == ["--kl_coef_schedule", "constant", "--stim_start_epoch", "0"]
    assert warm.warmup == "0.1"
    assert study.Setting("ct").overrides() == []
    with pytest.raises(ValueError, match="unknown intro"):
        study.Setting("stpp", 5, intro="someday").overrides()


def test_the_payoff_and_full_plans_train_the_recipe_against_ct_and_name_every_depth():
    study = load_study()
    payoff = study.plan_runs("payoff")
    assert [run.name for run in payoff[:4]] == [
        "stpp_l5_kl_cosine_up_seed1", "ct_seed1", "ct_r14_seed1", "ct_r8_seed1",
    ]  # fmt: skip
    assert [run.depth for run in payoff[:4]] == [20, 20, 14, 8] and len(payoff) == 12
    assert len({run.key() for run in payoff}) == 12 and {run.train_samples for run in payoff} == {5000}
    assert study.run_fields(payoff[2])["setting"] == "ct_r14"  # the report keeps the depths apart
    full = study.plan_runs("full")
    assert [(run.name, run.train_samples, run.depth) for run in full[:2]] == [
        ("stpp_l5_kl_cosine_up_seed1", None, 20), ("ct_seed1", None, 20),
    ]  # fmt: skip
    # The full plan began with the recipe at lambda 5; the CIFAR ST++ recipes now set the screen's pick, lambda 2.
    assert full[0].setting.overrides() == [
        "--kl_coef", "5", "--kl_loss", "kl", "--kl_coef_schedule", "cosine_up", "--stim_start_epoch", "0",
    ]  # fmt: skip
    for name in ("cifar10", "cifar100"):
        recipe = (REPO_ROOT / "configs" / f"{name}_resnet56_stpp.yaml").read_text()
        assert "kl_coef: 2.0" in recipe and "kl_coef_schedule: cosine_up" in recipe and "kl_loss: kl\n" in recipe
    assert study.RECIPE_SETTING.overrides() == [
        "--kl_coef", "2", "--kl_loss", "kl", "--kl_coef_schedule", "cosine_up", "--stim_start_epoch", "0",
    ]  # fmt: skip
    assert {run.warmup for run in full} == {"0"}  # as the 5k study: no warm-up at ResNet-20
    # Three seeds of the comparison first, then the smaller-lambda screen on seed 1 only.
    assert [run.name for run in full[6:]] == ["stpp_l1_kl_cosine_up_seed1", "stpp_l2_kl_cosine_up_seed1"]
    assert [run.seed for run in full[:6]] == [1, 1, 2, 2, 3, 3]
    # The GPU plan: today's recipe against CT at ResNet-56 with its recipes' one-epoch warm-up, the same in the run's
    # key and its record.
    gpu = study.plan_runs("gpu")
    assert [(run.name, run.depth, run.warmup) for run in gpu[:2]] == [
        ("stpp_l2_kl_cosine_up_seed1", 56, "0.005"), ("ct_seed1", 56, "0.005"),
    ]  # fmt: skip
    # Then, at paper scale too, the recipe's lambda before and the screen's other lambda, before the 5k study's grid.
    assert [run.name for run in gpu[6:9]] == [
        "stpp_l5_kl_cosine_up_seed1", "stpp_l1_kl_cosine_up_seed1", "stpp_l1_kl-_step0_seed1",
    ]  # fmt: skip
    stpp_recipe = study.run_fields(gpu[0])
    assert stpp_recipe["lr_warmup"] == "0.005" and gpu[0].key() != study.Run(gpu[0].setting, 1, 56, 200, None).key()
    for name in ("ct", "st", "stpp"):
        assert "warmup_steps: 0.005\n" in (REPO_ROOT / "configs" / f"cifar10_resnet56_{name}.yaml").read_text()


def test_an_unfinished_run_resumes_with_the_exact_resume(tmp_path):
    study = load_study()
    args = study.parse_args(["--plan", "cpu", "--out", str(tmp_path), "--data-dir", str(tmp_path)])
    run = study.plan_runs("cpu")[1]
    folder = tmp_path / run.name
    folder.mkdir()
    assert "--resume_from_checkpoint" not in study.train_command(run, folder, args)
    (folder / "checkpoint-40").mkdir()
    command = study.train_command(run, folder, args)
    assert command[command.index("--resume_from_checkpoint") + 1] == "true"
    assert command[command.index("--save_steps") + 1] == "40"  # an atomic checkpoint every epoch (5k / 128)
    assert command[command.index("--seed") + 1] == str(run.seed)


def test_no_run_is_launched_past_launch_until_and_a_trained_one_is_still_analysed(tmp_path, capsys):
    study = load_study()
    argv = ["--plan", "cpu", "--out", str(tmp_path), "--data-dir", str(tmp_path), "--launch-until"]
    args = study.parse_args([*argv, "2000-01-01T00:00"])
    run = study.plan_runs("cpu")[0]
    assert study.train_and_analyze(run, args) is None
    assert "not launched: past --launch-until 2000-01-01 00:00" in capsys.readouterr().out
    assert not (tmp_path / run.name).exists()
    (tmp_path / run.name).mkdir()
    (tmp_path / run.name / "all_results.json").write_text("{}")  # trained: its analysis goes on (and fails here)
    assert study.train_and_analyze(run, args) is None
    assert "analysing" in capsys.readouterr().out
    assert study.parse_args([*argv, "23:59"]).launch_until.date() == study.datetime.date.today()
    with pytest.raises(SystemExit):
        study.parse_args([*argv, "tonight"])
    assert "is not HH:MM or YYYY-MM-DDTHH:MM" in capsys.readouterr().err


def test_a_session_killed_mid_run_keeps_its_wall_time_and_training_minutes_count_every_session(tmp_path, monkeypatch):
    study = load_study()
    monkeypatch.setattr(study, "WALL_CLOCK_EVERY_S", 0.1)
    (tmp_path / "wall_seconds.txt").write_text("600.0\n")  # an earlier session
    stop = tmp_path / "stop"
    waiter = f"import pathlib, time\nwhile not pathlib.Path({str(stop)!r}).exists(): time.sleep(0.02)"
    finished = threading.Thread(
        target=study.train_keeping_wall_time, args=([sys.executable, "-c", waiter], tmp_path, 1)
    )
    finished.start()
    deadline = time.monotonic() + 60
    while len((tmp_path / "wall_seconds.txt").read_text().split()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    running = (tmp_path / "wall_seconds.txt").read_text().split()  # written while the command still runs
    stop.touch()
    finished.join()
    assert running[0] == "600.0" and len(running) == 2 and float(running[1]) > 0
    final = (tmp_path / "wall_seconds.txt").read_text().split()
    assert len(final) == 2 and float(final[1]) >= float(running[1])
    # 2 logs of 40 steps at 125 images a step: 5,000 images at 100/s, then 5,000 at 50/s (after a resume).
    (tmp_path / "train_results.json").write_text(json.dumps({"train_samples": 5000}))
    state = {"num_train_epochs": 2, "max_steps": 80, "log_history": [{"step": 40, "samples_per_second": 100.0}]}
    state["log_history"] += [{"step": 40, "eval_accuracy": 0.5}, {"step": 80, "samples_per_second": 50.0}]
    assert study.training_minutes(tmp_path, state) == {"train_minutes": round(150 / 60, 1)}


def test_results_carried_in_the_report_are_not_trained_again(tmp_path, capsys):
    study = load_study()
    run = study.plan_runs("smoke")[0]
    record = {**study.run_fields(run), "full_top1": 50.0, "subnet_top1_recalibrated": 40.0}
    record |= {"subnet_top1_inherited": 20.0, "collapsed": False, "curve_eval_top1": [[1.0, 30.0]]}
    record |= {"curve_train_ce": [[1.0, 2.0]], "wall_minutes": 1.0, "images_per_second": 100.0}
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "results.json").write_text(json.dumps([record]))
    study.main(["--plan", "smoke", "--out", str(tmp_path / "runs"), "--report-dir", str(report_dir)])
    assert not (tmp_path / "runs").exists()  # nothing trained
    assert "| stpp_l1_kl-_step0 | 1 | 0 | 50.00 |" in (report_dir / "results.md").read_text()
    assert (report_dir / "learning_curves.png").stat().st_size > 0


def _finished_record(study, run, full_top1: float) -> dict:
    record = {**study.run_fields(run), "full_top1": full_top1, "subnet_top1_recalibrated": 40.0}
    record |= {"subnet_top1_inherited": 20.0, "collapsed": False, "curve_eval_top1": [[1.0, 30.0]]}
    return record | {"curve_train_ce": [[1.0, 2.0]], "wall_minutes": 1.0, "images_per_second": 100.0}


def test_a_partial_call_reports_every_finished_run_and_the_combined_list(tmp_path, monkeypatch):
    # An --only call (one queue of a study split over processes) must not shrink the plan's report to
    # its own runs; the default place also gets every plan's runs in one list, each with its plan.
    study = load_study()
    monkeypatch.setattr(study, "MEASUREMENTS", tmp_path / "measurements")
    first, second = study.plan_runs("pilot")[:2]
    (tmp_path / "runs" / first.name).mkdir(parents=True)
    (tmp_path / "runs" / first.name / "result.json").write_text(json.dumps(_finished_record(study, first, 50.0)))
    report_dir = tmp_path / "measurements" / "pilot"
    report_dir.mkdir(parents=True)
    (report_dir / "results.json").write_text(json.dumps([_finished_record(study, second, 45.0)]))
    (tmp_path / "measurements" / "r14").mkdir()
    (tmp_path / "measurements" / "r14" / "results.json").write_text(json.dumps([{"name": "ct_seed1"}]))
    argv = ["--plan", "pilot", "--out", str(tmp_path / "runs"), "--report-dir", str(report_dir)]
    study.main([*argv, "--only", second.name, "--report-only"])
    assert {r["name"] for r in json.loads((report_dir / "results.json").read_text())} == {first.name, second.name}
    combined = json.loads((tmp_path / "measurements" / "results.json").read_text())
    assert sorted((r["plan"], r["name"]) for r in combined) == sorted(
        [("pilot", first.name), ("pilot", second.name), ("r14", "ct_seed1")]
    )
    with pytest.raises(SystemExit, match="ct_seed9: not a run of plan 'pilot'"):
        study.main([*argv, "--only", "ct_seed9", "--report-only"])


def test_the_report_pairs_settings_by_seed_in_plan_order_with_the_paired_t():
    from scipy.stats import ttest_rel

    study = load_study()
    runs = {(run.setting.name, run.seed): run for run in study.plan_runs("cpu")}
    top1 = {
        "ct": [70.0, 71.0, 72.0],
        "stpp_l1_kl-_step0": [70.5, 71.5, 72.0],
        "stpp_l5_kl-_cosine_up": [72.0, 73.0, 74.0],
        "stpp_l5_kl_cosine_up": [71.0, 73.5, 73.0],
    }
    results = [
        _finished_record(study, runs[name, seed], value)
        for name, values in top1.items()
        for seed, value in zip((1, 2, 3), values, strict=True)
    ]
    for r in results:
        r["subnet_top1_recalibrated"] = 60.0 + (r["kl_coef"] or 0) + (r["kl_loss"] == "kl")
    lines = study.report_markdown(sorted(results, key=lambda r: r["setting"]), "cpu").splitlines()
    settings = [line.split(" | ")[0][2:] for line in lines[4:8]]
    assert settings == list(top1)  # the plan's order, not the alphabet's
    assert "| 2.00 ± 0.00 | - |" in lines[6]  # the same gain on every seed: no t to divide by
    expected = ttest_rel(top1["stpp_l5_kl-_cosine_up"], top1["stpp_l1_kl-_step0"])
    row = next(line for line in lines if line.startswith("| stpp_l5_kl-_cosine_up − stpp_l1_kl-_step0 |"))
    assert f"| 1.67 ± 0.29 | {expected.statistic:.2f} (p {expected.pvalue:.3f}) | 3 of 3 | 4.00 ± 0.00 |" in row
    row = next(line for line in lines if line.startswith("| stpp_l5_kl_cosine_up − stpp_l5_kl-_cosine_up |"))
    assert (
        "| 1, 2, 3 | -0.50 ± 0.87 |" in row and "| 1 of 3 | 1.00 ± 0.00 |" in row
    )  # the later setting minus the earlier
    assert not any(line.startswith("| stpp_l10") for line in lines)  # no runs, no row


def test_the_full_plan_reports_its_gain_beside_the_5k_plans(tmp_path, monkeypatch):
    study = load_study()
    runs = {(run.setting.name, run.seed): run for run in study.plan_runs("full")}
    results = [
        _finished_record(study, runs[name, seed], value)
        for name, values in {"ct": [90.0, 91.0], "stpp_l5_kl_cosine_up": [90.5, 91.0]}.items()
        for seed, value in zip((1, 2), values, strict=True)
    ]
    # The screen's lambda 1 and 2 on seed 1: lambda 2 is measured at 5k too (a row at each size), lambda 1 is not.
    results += [_finished_record(study, runs["stpp_l1_kl_cosine_up", 1], 89.0)]
    results += [_finished_record(study, runs["stpp_l2_kl_cosine_up", 1], 90.25)]
    # The 5k plans' records as committed, and one plan whose records are missing (no row, no error).
    measurements = tmp_path / "measurements"
    for plan, gains in (("cpu", [2.0, 1.0, 1.5]), ("payoff", [1.0, 1.0, 1.0])):
        plan_runs = {(run.setting_label, run.seed): run for run in study.plan_runs(plan)}
        records = [_finished_record(study, plan_runs["ct", seed], 70.0) for seed in (1, 2, 3)]
        records += [
            _finished_record(study, plan_runs["stpp_l5_kl_cosine_up", s], 70.0 + g)
            for s, g in zip((1, 2, 3), gains, strict=True)
        ]
        if plan == "cpu":
            records += [_finished_record(study, plan_runs["stpp_l2_kl_cosine_up", s], 71.0) for s in (1, 2)]
        (measurements / plan).mkdir(parents=True)
        (measurements / plan / "results.json").write_text(json.dumps(records))
    monkeypatch.setattr(study, "MEASUREMENTS", measurements)
    lines = study.report_markdown(results, "full").splitlines()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    rows = {
        (c[0], c[1]): line for c, line in zip(cells, lines, strict=True) if c[1:2] in (["cpu"], ["payoff"], ["full"])
    }
    # The recipe first, the 5k plans before the full data; lambda 1 has no 5k runs: no row.
    assert list(rows) == [
        ("stpp_l5_kl_cosine_up", "cpu"), ("stpp_l5_kl_cosine_up", "payoff"), ("stpp_l5_kl_cosine_up", "full"),
        ("stpp_l2_kl_cosine_up", "cpu"), ("stpp_l2_kl_cosine_up", "full"),
    ]  # fmt: skip
    recipe = {plan: line for (setting, plan), line in rows.items() if setting == "stpp_l5_kl_cosine_up"}
    assert "| 5,000 | 100 | 4,000 | 1, 2, 3 |" in recipe["cpu"] and "| 1.50 ± 0.50 |" in recipe["cpu"]
    assert "| 1.00 ± 0.00 | - | 3 of 3 |" in recipe["payoff"]
    assert "| 50,000 | 50 | 19,550 | 1, 2 | 90.50 ± 0.71 | 90.75 ± 0.35 | 0.25 ± 0.35 |" in recipe["full"]
    assert "| 1 of 2 |" in recipe["full"]  # seed 2 tied: not a gain
    assert recipe["full"].endswith("| 2.000 / 2.000 |")  # the last epoch's training CE, CT / recipe
    assert "| 1, 2 | 70.00 ± 0.00 | 71.00 ± 0.00 | 1.00 ± 0.00 |" in rows["stpp_l2_kl_cosine_up", "cpu"]
    assert "| 50,000 | 50 | 19,550 | 1 | 90.00 | 90.25 | 0.25 |" in rows["stpp_l2_kl_cosine_up", "full"]
    # The figure: each setting's paired differences by seed in each plan, the same as the table's.
    points = {(p["setting"], p["plan"]): p for p in study.data_size_points(results, "full")}
    assert points["stpp_l5_kl_cosine_up", "cpu"]["full"] == {1: 2.0, 2: 1.0, 3: 1.5}
    assert points["stpp_l5_kl_cosine_up", "full"]["full"] == {1: 0.5, 2: 0.0}
    assert points["stpp_l2_kl_cosine_up", "full"]["full"] == {1: 0.25}
    report_dir = tmp_path / "report"
    study.write_report(results, report_dir, "full")
    assert (report_dir / "data_size.png").stat().st_size > 0
    monkeypatch.setattr(study, "MEASUREMENTS", tmp_path / "nothing")
    assert study.data_size_points(results, "full") == []  # one data size only: nothing to compare
    assert not [line for line in study.report_markdown(results, "full").splitlines() if "| cpu |" in line]
    assert not study.plot_data_size([], "full", tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def _screen_results(study, screened: dict[tuple[str, int], tuple[float, float]]) -> list[dict]:
    """The full plan's records: CT (full 88, sub-nets 39) and the recipe (full 87, sub-nets 81) on seeds 1-3, and the
    screened settings' runs as given ((name, seed): (full top-1, sub-nets))."""
    runs = {(run.setting.name, run.seed): run for run in study.plan_runs("full")}
    runs |= {(setting.name, seed): study.Run(setting, seed, 20, 50, None) for setting in study.PLANS["full"]["then"]
             for seed in (2, 3)}  # fmt: skip
    results = []
    for seed in (1, 2, 3):
        results += [_finished_record(study, runs["ct", seed], 88.0) | {"subnet_top1_recalibrated": 39.0}]
        results += [
            _finished_record(study, runs["stpp_l5_kl_cosine_up", seed], 87.0) | {"subnet_top1_recalibrated": 81.0}
        ]
    for key, (full, sub) in screened.items():
        results.append(_finished_record(study, runs[key], full) | {"subnet_top1_recalibrated": sub})
    return results


def _screen_report(study, screened: dict[str, tuple[float, float]]) -> list[str]:
    """The report with the screened settings' seed-1 runs as given (full top-1, sub-nets)."""
    results = _screen_results(study, {(name, 1): values for name, values in screened.items()})
    return study.report_markdown(results, "full").splitlines()


def test_the_screen_is_read_by_its_rule():
    study = load_study()
    # Waiting while a screened run is missing; the finished one is shown.
    lines = _screen_report(study, {"stpp_l1_kl_cosine_up": (87.6, 75.0)})
    assert "Waiting for stpp_l2_kl_cosine_up." in lines
    screen = lines[next(i for i, line in enumerate(lines) if line.startswith("The screen")) :]
    row = next(line for line in screen if line.startswith("| stpp_l1_kl_cosine_up | 1 |"))
    assert row.endswith("| 87.60 | 0.60 | 75.00 | 36.00 | yes |")  # +0.6 over the recipe, +36 over CT
    # Both finished: one misses the full-network bar (+0.4), the other qualifies and is sent on.
    sent_on = "By the rule, {} goes on to seeds 2, 3."
    lines = _screen_report(study, {"stpp_l1_kl_cosine_up": (87.4, 80.0), "stpp_l2_kl_cosine_up": (87.6, 75.0)})
    assert sent_on.format("stpp_l2_kl_cosine_up") in lines
    assert "Waiting for stpp_l2_kl_cosine_up on seed(s) 2, 3." in lines
    # Sub-networks under CT + 30 disqualify a better full network.
    lines = _screen_report(study, {"stpp_l1_kl_cosine_up": (89.0, 68.0), "stpp_l2_kl_cosine_up": (87.6, 75.0)})
    assert sent_on.format("stpp_l2_kl_cosine_up") in lines
    # Two qualify within 0.2 of each other: the better sub-networks win; further apart, the better full network.
    lines = _screen_report(study, {"stpp_l1_kl_cosine_up": (87.9, 70.0), "stpp_l2_kl_cosine_up": (87.75, 78.0)})
    assert sent_on.format("stpp_l2_kl_cosine_up") in lines
    lines = _screen_report(study, {"stpp_l1_kl_cosine_up": (88.0, 70.0), "stpp_l2_kl_cosine_up": (87.75, 78.0)})
    assert sent_on.format("stpp_l1_kl_cosine_up") in lines
    # None qualifies: the recipe stays, and the plan adds no run.
    none = {("stpp_l1_kl_cosine_up", 1): (87.2, 78.0), ("stpp_l2_kl_cosine_up", 1): (86.0, 80.0)}
    lines = study.report_markdown(_screen_results(study, none), "full").splitlines()
    assert "No screened setting qualifies: by the rule the recipe (stpp_l5_kl_cosine_up) stays." in lines
    assert len(study.plan_runs("full", _screen_results(study, none))) == len(study.plan_runs("full")) == 8
    # Plans without a screen report none.
    assert not any(line.startswith("The screen") for line in study.report_markdown([], "cpu").splitlines())


def test_the_picked_setting_runs_on_the_other_seeds_and_is_confirmed_or_not():
    study = load_study()
    screen = {("stpp_l1_kl_cosine_up", 1): (87.4, 80.0), ("stpp_l2_kl_cosine_up", 1): (87.6, 75.0)}
    plan = study.plan_runs("full", _screen_results(study, screen))
    assert [run.name for run in plan[8:]] == ["stpp_l2_kl_cosine_up_seed2", "stpp_l2_kl_cosine_up_seed3"]
    assert plan[8] == study.Run(plan[7].setting, 2, 20, 50, None) == replace(plan[7], seed=2)  # the screen's run
    # Ahead on every seed by a mean of 0.5 or more, sub-networks 30 above CT's on each: the recipes take it.
    taken = screen | {("stpp_l2_kl_cosine_up", 2): (87.3, 76.0), ("stpp_l2_kl_cosine_up", 3): (87.7, 74.0)}
    lines = study.report_markdown(_screen_results(study, taken), "full").splitlines()
    verdict = next(line for line in lines if line.startswith("Over seeds 1, 2, 3"))
    assert verdict.startswith("Over seeds 1, 2, 3, stpp_l2_kl_cosine_up − the recipe: 0.53 ± 0.21 points")
    assert verdict.endswith("ahead on 3 of 3; sub-networks at least 30 above CT's on every seed: yes. By the rule, "
                            "the recipes take it.")  # fmt: skip
    # A mean under 0.5, a seed behind, or sub-networks that fall to CT + 30 on one seed: the recipe stays.
    for seed_2, seed_3 in (((87.2, 76.0), (87.3, 74.0)), ((86.9, 76.0), (88.5, 74.0)), ((87.6, 68.0), (87.7, 74.0))):
        results = _screen_results(
            study, screen | {("stpp_l2_kl_cosine_up", 2): seed_2, ("stpp_l2_kl_cosine_up", 3): seed_3}
        )
        verdict = next(line for line in study.report_markdown(results, "full").splitlines() if line.startswith("Over"))
        assert verdict.endswith("By the rule, the recipe (stpp_l5_kl_cosine_up) stays."), verdict


def test_the_runner_goes_on_to_the_picked_setting_once_the_screen_is_in(tmp_path, monkeypatch):
    # The screen's last run finishes in this call: the runner then trains the setting the rule picks on seeds 2 and 3,
    # in the same call, and nothing else.
    study = load_study()
    records = {
        (r["setting"], r["seed"]): r for r in _screen_results(study, {("stpp_l1_kl_cosine_up", 1): (87.4, 80.0)})
    }
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "results.json").write_text(json.dumps(list(records.values())))
    trained = []

    def fake_train(run, args):
        trained.append(run.name)
        full, sub = (87.6, 75.0) if run.seed == 1 else (87.7, 76.0)
        return _finished_record(study, run, full) | {"subnet_top1_recalibrated": sub}

    monkeypatch.setattr(study, "train_and_analyze", fake_train)
    monkeypatch.setattr(study, "check_environment", lambda args: None)
    study.main(["--plan", "full", "--out", str(tmp_path / "runs"), "--report-dir", str(report_dir)])
    assert trained == ["stpp_l2_kl_cosine_up_seed1", "stpp_l2_kl_cosine_up_seed2", "stpp_l2_kl_cosine_up_seed3"]
    report = (report_dir / "results.md").read_text()
    assert "By the rule, stpp_l2_kl_cosine_up goes on to seeds 2, 3." in report and "the recipes take it." in report
    assert len(json.loads((report_dir / "results.json").read_text())) == 10  # 6 + the screen 2 + its 2 follow-ups


@pytest.mark.skipif(not (CIFAR10_DIR / "train.parquet").is_file(), reason="shared CIFAR-10 parquet files not present")
def test_a_tiny_study_trains_analyses_and_reports(tmp_path):
    study = load_study()
    report_dir = tmp_path / "report"
    argv = ["--plan", "smoke", "--out", str(tmp_path / "runs"), "--report-dir", str(report_dir)]
    argv += ["--curve-every", "2", "--curve-samples", "64", "--test-samples", "128"]
    argv += ["--num-subnets", "2", "--recalibrate-bn", "64"]
    study.main(argv)
    results = json.loads((report_dir / "results.json").read_text())
    assert len(results) == 1 and set(results[0]) >= REQUIRED
    result = results[0]
    assert result["num_test_images"] == 128 and result["num_subnets"] == 2
    assert [epoch for epoch, _ in result["curve_eval_top1"]] == [2.0, 4.0, 6.0]
    assert 0 <= result["full_top1"] <= 100 and 0 <= result["subnet_top1_recalibrated"] <= 100
    assert result == json.loads((tmp_path / "runs" / result["name"] / "result.json").read_text())
    assert result["train_minutes"] > 0 and result["sessions"] == 1


def test_the_fair_payoff_plans_train_networks_alone_at_random_and_dedicated_sizes(tmp_path):
    """Issue 41: payoff_fair (5k) and payoff_full (45,000 images of a fixed split)."""
    study = load_study()
    fair = study.plan_runs("payoff_fair")
    assert [run.name for run in fair[:6]] == [
        "ct_px13_r8_seed1", "ct_px13_r8_seed2", "ct_px13_r8_seed3", "ct_random_seed1", "ct_random_r14_seed1",
        "ct_random_r8_seed1",
    ]  # fmt: skip
    assert len({run.key() for run in fair}) == len(fair) == 33 and {run.train_samples for run in fair} == {5000}
    assert fair[-1].name == "stpp_l2_kl_cosine_up_seed3"
    # The full network's input: the random sizes ST++ draws for its sub-networks, or one size as a user would train.
    assert study.CT_RANDOM.overrides() == ["--full_input_scale", "0.43"] and study.CT_RANDOM.image_size == 32
    dedicated = study.Setting("ct", input="px19")
    assert (
        dedicated.overrides() == ["--image_size", "19"] and dedicated.image_size == 19 and dedicated.name == "ct_px19"
    )
    assert study.run_fields(fair[0])["input"] == "px13"
    with pytest.raises(ValueError, match="only CT takes another input"):
        study.Setting("stpp", 2, input="random").overrides()
    # A record from before inputs were a setting is the 32-px training it was.
    assert study.Run(study.CT, 1, 20, 100, 5000).key() != study.Run(study.CT_RANDOM, 1, 20, 100, 5000).key()
    full = study.plan_runs("payoff_full")
    assert [run.name for run in full[:8]] == [
        "stpp_l2_kl_cosine_up_seed1", "ct_seed1", "ct_r14_seed1", "ct_r8_seed1", "ct_random_seed1",
        "ct_random_r14_seed1", "ct_random_r8_seed1", "stpp_l5_kl_cosine_up_seed1",
    ]  # fmt: skip
    assert {run.num_train_images for run in full} == {45_000} and len(full) == 22
    assert {run.epochs for run in full} == {50} and study.steps_per_epoch(full[0]) == 352
    # Not the full plan's runs, which trained on all 50,000.
    assert full[1].key() != study.Run(study.CT, 1, 20, 50, None).key()


def test_the_lever_plan_adds_one_bignas_lever_to_the_recipe_each(tmp_path):
    """Issue 41's lever screen at 5k: the recipe's ST++ with each lever, seed 1, the payoff_fair plan's scale."""
    study = load_study()
    runs = study.plan_runs("payoff_levers")
    assert [run.name for run in runs] == [
        "stpp_l2_kl_cosine_up_sandwich_seed1", "stpp_l2_kl_cosine_up_bias0.5_seed1",
        "stpp_l2_kl_cosine_up_zerogamma_seed1", "stpp_l2_kl_cosine_up_floor0.05_seed1",
    ]  # fmt: skip
    assert {(run.epochs, run.train_samples, run.depth) for run in runs} == {(100, 5000, 20)}
    recipe = study.RECIPE_SETTING.overrides()
    assert [run.setting.overrides()[len(recipe) :] for run in runs] == [
        ["--sandwich", "true"], ["--subnet_size_bias", "0.5"], ["--zero_init_residual", "true"], ["--lr_floor", "0.05"],
    ]  # fmt: skip
    assert all(run.setting.overrides()[: len(recipe)] == recipe for run in runs)
    # Each is a run of its own, not the recipe's carried record; a record without a lever is the recipe's.
    recipe_run = study.Run(study.RECIPE_SETTING, 1, 20, 100, 5000)
    assert len({run.key() for run in [*runs, recipe_run]}) == 5
    (tmp_path / "results.json").write_text(json.dumps([study.run_fields(recipe_run) | {"full_top1": 75.5}]))
    old = json.loads((tmp_path / "results.json").read_text())
    del old[0]["lever"]  # written before settings took a lever
    (tmp_path / "results.json").write_text(json.dumps(old))
    assert list(study.carried_results(tmp_path)) == [recipe_run.key()]
    assert study.run_fields(runs[0])["lever"] == "sandwich"
    with pytest.raises(ValueError, match="the lever 'sandwich' is none of ST\\+\\+'s"):
        study.Setting("ct", lever="sandwich").overrides()
    with pytest.raises(ValueError, match="the lever 'floor' is none of"):
        study.Setting("stpp", 2, lever="floor").overrides()


def test_the_fixed_split_is_class_balanced_disjoint_and_the_same_for_every_run(tmp_path):
    from datasets import Dataset

    study = load_study()
    labels = [i % 10 for i in range(300)]
    data = tmp_path / "data"
    data.mkdir()
    Dataset.from_dict({"image_id": list(range(300)), "label": labels}).to_parquet(str(data / "train.parquet"))
    train, heldout = study.fixed_split(data, tmp_path / "study", 40)
    held, kept = Dataset.from_parquet(str(heldout)).to_dict(), Dataset.from_parquet(str(train)).to_dict()
    assert sorted(held["label"]) == sorted(list(range(10)) * 4)  # as many of every class
    assert sorted(held["image_id"] + kept["image_id"]) == list(range(300))  # disjoint, together the whole split
    assert held["image_id"] == sorted(held["image_id"])
    first = held["image_id"]
    again = study.fixed_split(data, tmp_path / "other", 40)[1]  # another study folder: the same rows
    assert Dataset.from_parquet(str(again)).to_dict()["image_id"] == first
    args = study.parse_args(["--plan", "payoff_full", "--out", str(tmp_path / "study"), "--data-dir", str(data)])
    run = study.plan_runs("payoff_full")[0]
    run = replace(run, heldout=40)
    command = study.train_command(run, tmp_path / "study" / run.name, args)
    assert command[command.index("--train_file") + 1] == str(train) and "--max_train_samples" not in command
    assert study.run_fields(run)["heldout_file"] == heldout.name
    with pytest.raises(SystemExit, match="cannot hold as many of each of 10 classes"):
        study.fixed_split(data, tmp_path / "odd", 45)

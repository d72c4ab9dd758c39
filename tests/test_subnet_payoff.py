"""``bench/subnet_payoff.py``: one seed end to end on tiny models and data (search, exports, report, cache)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from types import ModuleType

import pytest
import torch
from conftest import REPO_ROOT
from datasets import Dataset, Image

from stim_hf.data.builtin_datasets import load_builtin_dataset
from stim_hf.data.image_datasets import ROW_INDEX_COLUMN, DataArguments, load_image_datasets
from stim_hf.method.batchnorm import batchnorm_layers
from stim_hf.models.cifar_resnet import CifarResNetConfig, CifarResNetForImageClassification

sys.path.insert(0, str(REPO_ROOT / "bench"))  # the benchmark's modules (bench/payoff/), as the script imports them
from payoff.fair_report import setting_comparison  # noqa: E402
from payoff.finetuning import finetune_budgets  # noqa: E402
from payoff.lever_screen import base_setting, lever_screen, lever_table  # noqa: E402
from payoff.network_records import score_network  # noqa: E402
from payoff.scoring import finetune_pick  # noqa: E402

SCORED = re.compile(r"^  (CT|ST\+\+|ResNet-(?:8|14|20)) [\d,]+ @\d+: test top-1 ", re.MULTILINE)


def load_payoff() -> ModuleType:
    """The benchmark script as a module."""
    spec = importlib.util.spec_from_file_location("subnet_payoff", REPO_ROOT / "bench" / "subnet_payoff.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def save_run(folder, depth: int, full_top1: float, seed: int, **fields) -> None:
    """A finished study run: a tiny CIFAR ResNet with random weights and statistics, and its result.json (with the
    study's cost fields, and ``fields``)."""
    torch.manual_seed(seed)
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=depth, widths=[4, 8, 8], num_labels=10))
    with torch.no_grad():
        for layer in batchnorm_layers(model):
            layer.running_var.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    cost = {"train_minutes": depth / 2, "wall_minutes": depth / 1.5, "images_per_second": 100.0}
    (folder / "result.json").write_text(
        json.dumps({"full_top1": full_top1, "seed": seed, "train_samples": 300, "depth": depth, **cost, **fields})
    )


def digits_data(tmp_path):
    """400 training and 80 test digits as the benchmark's train/test.parquet."""
    digits = load_builtin_dataset("sklearn:digits")["train"].shuffle(seed=0)
    data = tmp_path / "data"
    data.mkdir()
    digits.select(range(400)).to_parquet(str(data / "train.parquet"))
    digits.select(range(400, 480)).to_parquet(str(data / "test.parquet"))
    return data


def test_one_seed_end_to_end_with_its_cache_and_a_seed_not_finished(tmp_path, capsys):
    payoff = load_payoff()
    data = digits_data(tmp_path)
    study = tmp_path / "study"
    save_run(study / "ct_seed1", 20, 70.0, seed=1)
    save_run(study / "stpp_l5_kl_cosine_up_seed1", 20, 71.0, seed=2)
    save_run(study / "ct_r14_seed1", 14, 72.0, seed=3)
    save_run(study / "ct_r8_seed1", 8, 60.0, seed=4)
    save_run(study / "ct_seed2", 20, 70.0, seed=5)  # seed 2 lacks its other runs
    report = tmp_path / "report"
    argv = ["--front", "32px", "--study", str(study), "--seeds", "1,2", "--report-dir", str(report)]
    argv += ["--data-dir", str(data)]
    argv += ["--input-sizes", "16,32", "--budgets", "0.05,0.25,ResNet-14,1.0", "--holdout-samples", "96"]
    argv += ["--search-recalibrate-bn", "64", "--recalibrate-bn", "32", "--test-samples", "64"]
    assert payoff.main(argv) == 0
    out = capsys.readouterr().out
    assert "seed 2: not all of its runs have finished; skipped" in out
    assert SCORED.search(out)  # a line per network scored on the test split
    [record] = json.loads((report / "results.json").read_text())
    checkpoints = record["checkpoints"]
    # Keyed by the study's setting names, the recipe's marked; CT's ResNet-20 is also the from-scratch ResNet-20.
    assert set(checkpoints) == {"stpp_l5_kl_cosine_up", "ct", "ct_r14", "ct_r8"}
    assert [name for name, c in checkpoints.items() if c["recipe"]] == ["stpp_l5_kl_cosine_up"]
    assert checkpoints["ct"]["scratch_label"] == "ResNet-20" and checkpoints["ct_r14"]["full_test_top1"] == 72.0
    # The from-scratch points: each network whole, at every input size, FLOPs shares of the ResNet-20 at 32 px.
    points = {(p["network"], p["input_size"]): p for p in record["scratch_points"]}
    assert set(points) == {(n, s) for n in ("ResNet-8", "ResNet-14", "ResNet-20") for s in (16, 32)}
    assert points[("ResNet-20", 32)]["flop_share"] == 1.0 and all(p["depths"] in ([1] * 3, [2] * 3, [3] * 3)
                                                                  for p in points.values())  # fmt: skip
    assert any(p["on_front"] for p in points.values())
    # A budget named by a network is its FLOPs: the ResNet-14 at 32 px is within its own budget.
    assert [b["budget_name"] for b in record["budgets"]] == ["0.05", "0.25", "ResNet-14", "1.0"]
    assert record["budgets"][2]["budget"] == points[("ResNet-14", 32)]["flop_share"]
    for b in record["budgets"]:
        for label, pick in b["picks"].items():
            if pick is not None:
                assert pick["flop_share"] <= b["budget"] + 1e-6, (label, b)
                assert 0 <= pick["test_top1"] <= 100
    # At the whole budget every candidate is allowed: the picks are the best on the held-out images.
    whole = record["budgets"][-1]["picks"]
    assert whole["from scratch"]["heldout_top1"] == max(p["heldout_top1"] for p in points.values())
    assert whole["ST++"] is not None and whole["CT"] is not None
    st = checkpoints["stpp_l5_kl_cosine_up"]
    assert st["front"] and [f["flop_share"] for f in st["front"]] == sorted(f["flop_share"] for f in st["front"])
    assert st["train_minutes"] == 10.0 and st["search_seconds"] >= 0
    text = (report / "results.md").read_text()
    assert "| 25 % |" in text and "(ResNet-14) |" in text and "96 held-out training images" in text
    assert "ST++ / CT wall" in text
    # Scores are kept: a rerun with other budgets (--redo) exports only the picks it has not scored.
    assert len(json.loads((report / "seed1" / "test_scores.json").read_text())) >= len(points)
    # The held-out images are training-split images the seed's networks never saw (they trained on a seeded 300).
    seen = set(
        load_image_datasets(DataArguments(train_file=str(data / "train.parquet"), validation_file=str(data /
                            "test.parquet"), max_train_samples=300), seed=1)["train"][ROW_INDEX_COLUMN]
    )  # fmt: skip
    images = lambda name: Dataset.from_parquet(str(name)).cast_column("image", Image(decode=False))["image"]  # noqa: E731
    train_bytes = [image["bytes"] for image in images(data / "train.parquet")]
    heldout = {image["bytes"] for image in images(study / "heldout_seed1_96.parquet")}
    assert len(heldout) == 96 and not heldout & {train_bytes[row] for row in seen}
    assert record["heldout"]["seen_in_training"] is False
    assert (report / "payoff.png").stat().st_size > 0
    assert (report / "seed1" / "search" / "pareto.json").is_file()
    assert (report / "seed1" / "search_scratch" / "pareto.json").is_file()
    # Run again: the seed comes from its cache, nothing is searched or exported again.
    assert payoff.main(argv) == 0
    assert not SCORED.search(capsys.readouterr().out)
    assert json.loads((report / "results.json").read_text()) == [record]
    # The cache stands without the run folders (a new machine writes the same report again) ...
    shutil.rmtree(study)
    assert payoff.main(argv) == 0
    assert json.loads((report / "results.json").read_text()) == [record]
    # ... but never answers for another ST++ setting.
    with pytest.raises(SystemExit, match="holds the search of stpp_l5_kl_cosine_up, not of --st-setting stpp_l2"):
        payoff.main([*argv, "--st-setting", "stpp_l2_kl_cosine_up"])


def test_fine_tuning_the_st_pick_kept_per_seed_and_reported(tmp_path, capsys):
    payoff = load_payoff()
    data = digits_data(tmp_path)
    study = tmp_path / "study"
    for i, (name, depth) in enumerate([("ct", 20), ("stpp_l5_kl_cosine_up", 20), ("ct_r14", 14), ("ct_r8", 8)]):
        save_run(study / f"{name}_seed1", depth, 70.0, seed=i + 1)
    report = tmp_path / "report"
    argv = ["--front", "32px", "--study", str(study), "--seeds", "1", "--report-dir", str(report)]
    argv += ["--data-dir", str(data)]
    argv += ["--input-sizes", "16,32", "--budgets", "0.25,1.0", "--holdout-samples", "96"]
    argv += ["--search-recalibrate-bn", "64", "--recalibrate-bn", "32", "--test-samples", "0"]
    assert payoff.main([*argv, "--finetune-epochs", "1,2", "--finetune-budgets", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning ST++'s picks at budgets 1.0 for [1, 2] epochs" in out
    [record] = json.loads((report / "results.json").read_text())
    whole = record["budgets"][-1]
    pick = whole["picks"]["ST++"]
    for budget in record["budgets"]:  # another budget shows them only where its pick is the same network
        same = [budget["picks"]["ST++"][k] for k in ("depths", "input_size")] == [pick["depths"], pick["input_size"]]
        assert ("finetuned" in budget) == same
    assert set(whole["finetuned"]) == {"1", "2"}
    for n, entry in whole["finetuned"].items():
        assert entry["epochs"] == int(n) and entry["depths"] == pick["depths"]
        assert entry["input_size"] == pick["input_size"] and entry["train_samples"] == 300  # the run's own subset
        # Before fine-tuning it is the pick as scored: the same export, BatchNorm and test images (one image: 1.25).
        assert abs(entry["test_top1_before"] - pick["test_top1"]) <= 1.25
        assert 0 <= entry["test_top1_after"] <= 100 and entry["minutes"] > 0
    assert "| 100 % | 2 | 1 |" in (report / "results.md").read_text()
    # Kept per seed: a run without --finetune-epochs reports them again and trains nothing.
    assert payoff.main(argv) == 0
    assert "fine-tuning" not in capsys.readouterr().out
    assert json.loads((report / "results.json").read_text())[0] == record
    # 'shortest' picks the budgets where ST++ leads least; an unknown budget is refused by name.
    leads = {"0.1": (50.0, 40.0), "0.5": (60.0, 61.0), "1.0": (70.0, 69.0)}  # ST++ and from-scratch picks
    synthetic = {"budgets": [{"budget_name": name, "picks": {"ST++": {"test_top1": st}, "from scratch":
                 {"test_top1": scratch}}} for name, (st, scratch) in leads.items()]}  # fmt: skip
    assert finetune_budgets([synthetic], payoff.parse_args(argv)) == ["0.5", "1.0"]
    with pytest.raises(SystemExit, match="0.5: not among --budgets 0.25,1.0"):
        finetune_budgets([record], payoff.parse_args([*argv, "--finetune-budgets", "0.5"]))


def test_fair_front_scores_each_network_once_and_reports_from_the_records(tmp_path, capsys):
    payoff = load_payoff()
    data = digits_data(tmp_path)
    study = tmp_path / "study"
    runs = {  # run name: depth, the study's input setting
        "stpp_l2_kl_cosine_up_seed1": (20, "batch"),
        "ct_seed1": (20, "batch"),
        "ct_r14_seed1": (14, "batch"),
        "ct_r8_seed1": (8, "batch"),
        "ct_random_r8_seed1": (8, "random"),
        "ct_px16_r8_seed1": (8, "px16"),
        "stpp_l2_kl_cosine_up_sandwich_seed1": (20, "batch"),  # a BigNAS lever on the recipe
    }
    for i, (name, (depth, source)) in enumerate(runs.items()):
        method = "stpp" if name.startswith("stpp") else "ct"
        setting = name.removesuffix("_seed1")
        save_run(study / name, depth, 70.0, seed=i + 1, method=method, setting=setting, input=source,
                 kl_coef=2.0 if method == "stpp" else 0.0, epochs=3,
                 lever="sandwich" if "sandwich" in name else "")  # fmt: skip
    # The seed's first search draws the held-out images from the runs' own seed (1), whatever their weights' seeds.
    for folder in study.iterdir():
        result = json.loads((folder / "result.json").read_text())
        (folder / "result.json").write_text(json.dumps(result | {"seed": 1}))
    report = tmp_path / "report"
    argv = ["--study", str(study), "--seeds", "1", "--report-dir", str(report), "--data-dir", str(data)]
    argv += ["--input-sizes", "16,32", "--budgets", "0.05,0.25,ResNet-14,1.0", "--holdout-samples", "96"]
    argv += ["--search-recalibrate-bn", "64", "--recalibrate-bn", "32", "--test-samples", "64"]
    argv += ["--st-settings", "stpp_l2_kl_cosine_up"]
    assert payoff.main(argv) == 0
    out = capsys.readouterr().out
    assert all(f"scoring {name}" in out for name in runs)
    records = {name: json.loads((report / "networks" / "seed1" / f"{name}.json").read_text()) for name in runs}
    st = records["stpp_l2_kl_cosine_up_seed1"]
    assert st["network"] == "ST++ (λ 2)" and len(st["candidates"]) == 27 * 2
    assert all(("test_top1" in p) == p["on_front"] for p in st["candidates"]) and st["heldout"]["images"] == 96
    # Trained alone: the network whole at every size, each point scored; a dedicated training at its size only.
    assert [(p["input_size"], p["trained_at"]) for p in records["ct_random_r8_seed1"]["candidates"]] == [
        (16, "random"), (32, "random")]  # fmt: skip
    assert [(p["input_size"], p["trained_at"]) for p in records["ct_px16_r8_seed1"]["candidates"]] == [(16, 16)]
    assert all("test_top1" in p for name in runs if name.startswith("ct") for p in records[name]["candidates"])
    assert records["ct_seed1"]["candidates"][-1]["flop_share"] == 1.0
    [seed] = json.loads((report / "fair" / "results.json").read_text())
    assert seed["train_samples"] == 300 and seed["heldout"]["seen_in_training"] is False
    assert [b["budget_name"] for b in seed["budgets"]] == ["0.05", "0.25", "ResNet-14", "1.0"]
    points = seed["scratch_points"]
    for budget in seed["budgets"]:
        picks = budget["picks"]
        assert set(picks) == {
            "ST++",
            "from scratch",
            "from scratch, 32 px and random sizes",
            "from scratch, 32 px only",
        }
        for pick in picks.values():
            assert pick is None or pick["flop_share"] <= budget["budget"] + 1e-6
        # The fair front holds every training: its pick is at least as good on the held-out images as the others'.
        fair, only_32 = picks["from scratch"], picks["from scratch, 32 px only"]
        if only_32 is not None:
            assert fair["heldout_top1"] >= only_32["heldout_top1"] and only_32["trained_at"] == 32
    whole = seed["budgets"][-1]["picks"]["from scratch"]
    assert whole["heldout_top1"] == max(p["heldout_top1"] for p in points)
    text = (report / "fair" / "results.md").read_text()
    assert "| ResNet-8 @16 | 1 |" in text  # the dedicated check: the 16-px training against the random one at 16
    assert (report / "fair" / "payoff.png").stat().st_size > 0
    # Scored once: a rerun scores nothing.
    assert payoff.main(argv) == 0
    assert "scoring" not in capsys.readouterr().out
    # A BigNAS lever: its own ST++ record, screened against the setting it changes only when asked for.
    assert records["stpp_l2_kl_cosine_up_sandwich_seed1"]["network"] == "ST++ (λ 2, sandwich)"
    assert not (report / "fair" / "levers.json").exists() and "BigNAS" not in text
    assert payoff.main([*argv, "--lever-settings", "stpp_l2_kl_cosine_up_sandwich"]) == 0
    [screen] = json.loads((report / "fair" / "levers.json").read_text())
    assert screen["base_setting"] == "stpp_l2_kl_cosine_up" and screen["seeds"] == [1] and len(screen["budgets"]) == 4
    assert (
        "(`stpp_l2_kl_cosine_up_sandwich`) against `stpp_l2_kl_cosine_up`, seed(s) 1"
        in (report / "fair" / "results.md").read_text()
    )
    # The first lever: ST++'s pick fine-tuned at a budget, kept per run (committed) and reported with its minutes.
    assert payoff.main([*argv, "--finetune-epochs", "1", "--finetune-budgets", "1.0", "--finetune-seeds", "1"]) == 0
    assert "fine-tuning stpp_l2_kl_cosine_up's picks at budgets 1.0 for [1] epochs, seeds 1" in capsys.readouterr().out
    [(key, entry)] = json.loads((report / "finetune" / "seed1" / "stpp_l2_kl_cosine_up_seed1.json").read_text()).items()
    [seed] = json.loads((report / "fair" / "results.json").read_text())
    whole = seed["budgets"][-1]
    st_pick = whole["picks"]["ST++"]
    assert key == f"{','.join(map(str, st_pick['depths']))} @{st_pick['input_size']} 1 epochs"
    assert whole["finetuned"] == {"1": entry} and entry["train_samples"] == 300  # the images the run trained on
    assert 0 <= entry["test_top1_after"] <= 100 and entry["minutes"] > 0
    text = (report / "fair" / "results.md").read_text()
    assert (
        "Fine-tuning ST++'s pick (issue 41's first lever" in text
        and f"| 1 ep. {key.removesuffix(' 1 epochs')}: " in text
    )
    for extra, refusal in [
        (["--finetune-seeds", "1"], "give --finetune-epochs too"),
        (["--finetune-epochs", "5", "--finetune-seeds", "1,4"], "--finetune-seeds 4: not among --seeds 1"),
    ]:
        with pytest.raises(SystemExit):
            payoff.parse_args([*argv, *extra])
        assert refusal in capsys.readouterr().err
    # 'behind' takes the budgets where ST++ misses the bar (level or short), not where it leads.
    rows = {"0.1": [(50.0, 40.0)], "0.5": [(60.0, 59.8)], "1.0": [(70.0, 71.0)]}  # ST++ and fair picks by seed
    synthetic = [{"budgets": [{"budget_name": name, "picks": {"ST++": {"test_top1": pairs[i][0]}, "from scratch":
                  {"test_top1": pairs[i][1]}}} for name, pairs in rows.items()]} for i in range(1)]  # fmt: skip
    assert finetune_budgets(synthetic, payoff.parse_args([*argv, "--finetune-budgets", "behind"])) == [
        "0.5", "1.0"]  # fmt: skip
    # The records stand without the study's run folders.
    shutil.rmtree(study)
    assert payoff.main(argv) == 0
    assert json.loads((report / "fair" / "results.json").read_text()) == [seed]
    # Two data sizes side by side, from their fair reports alone (here a second report of a subset of the records).
    full = tmp_path / "full"
    shutil.copytree(report / "networks", full / "networks")
    assert payoff.main([*argv, "--report-dir", str(full), "--budgets", "0.25,1.0"]) == 0
    both = tmp_path / "both"
    assert payoff.main(["--data-sizes", f"{report},{full}", "--report-dir", str(both)]) == 0
    text = (both / "by_data_size.md").read_text()
    assert "(../report/fair/results.md)" in text and "(../full/fair/results.md)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and " % " in line]
    assert [row.split(" | ")[0] for row in rows] == ["| 5 %", "| 25 %", rows[2].split(" | ")[0], "| 100 %"]
    assert all(row.count(" / ") == 6 for row in rows)
    assert rows[2].endswith(" | - / - / - / - |") and not rows[3].endswith(" - |")  # ResNet-14: not a budget of full
    assert (both / "by_data_size.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no fair report there; write it first"):
        payoff.main(["--data-sizes", f"{report},{tmp_path / 'nowhere'}"])


def test_a_fixed_split_plan_is_scored_on_its_whole_held_out_part(tmp_path):
    """payoff_full's runs train on a fixed split: the search picks on all of its held-out part, and the networks'
    statistics are re-estimated on the part they trained on."""
    spec = importlib.util.spec_from_file_location("full_network_study", REPO_ROOT / "bench" / "full_network_study.py")
    runner = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = runner
    spec.loader.exec_module(runner)
    payoff = load_payoff()
    data = digits_data(tmp_path)
    study = tmp_path / "study"
    train, heldout = runner.fixed_split(data, study, 40)
    split = {"heldout": 40, "train_file": train.name, "heldout_file": heldout.name, "train_samples": None}
    save_run(study / "ct_r8_seed1", 8, 60.0, seed=1, method="ct", setting="ct_r8", kl_coef=0.0, epochs=3, **split)
    report = tmp_path / "report"
    argv = ["--study", str(study), "--report-dir", str(report), "--data-dir", str(data), "--input-sizes", "16,32"]
    args = payoff.parse_args([*argv, "--search-recalibrate-bn", "64", "--recalibrate-bn", "32", "--test-samples", "64"])
    record = score_network(study / "ct_r8_seed1", args)
    assert record["heldout"] == {"images": 40, "file": heldout.name, "seen_in_training": False}
    assert record["train_samples"] == 50_000 - 40 and len(record["candidates"]) == 2
    assert not list(study.glob("heldout_seed*"))  # no draw of its own: the plan's split
    # Fine-tuning a pick of such a run trains on the split's training part, all of it.
    pick = record["candidates"][0] | {"depths": [1, 1, 1]}
    entry = finetune_pick(
        study / "ct_r8_seed1", pick, 1, json.loads((study / "ct_r8_seed1" / "result.json").read_text()), args
    )
    assert entry["train_samples"] == 400 - 40 and entry["epochs"] == 1


def test_two_st_settings_compared_with_the_lambda_screens_rule():
    """lambda 5 against lambda 2, paired over the seeds both have: it goes on to seeds 2-3 only if it is ahead by at
    least 0.5 points at 3 or more budgets."""

    def seed_record(seed: int, network: str, picks: list[float], full: float) -> dict:
        run = f"{network}_seed{seed}"
        budgets = [{"budget": share, "budget_name": str(share), "picks": {"ST++": {"test_top1": top1}}}
                   for share, top1 in zip((0.1, 0.25, 0.5, 1.0), picks, strict=True)]  # fmt: skip
        return {"seed": seed, "st_network": network, "st_run": run, "budgets": budgets,
                "networks": {run: {"top1": full}}}  # fmt: skip

    l5 = [seed_record(1, "λ 5", [60.0, 70.0, 75.0, 75.0], 75.0), seed_record(2, "λ 5", [61.0, 70.0, 75.0, 75.0], 74.0)]
    l2 = [seed_record(s, "λ 2", [59.0, 69.6, 74.0, 75.2], 76.0) for s in (1, 2, 3)]
    text = "\n".join(setting_comparison(l5, l2))
    assert "λ 5 against λ 2, seeds 1, 2 " in text  # seed 3 has no lambda-5 record
    assert "| 10 % | 60.50 ± 0.71 | 59.00 ± 0.00 | 1.50 ± 0.71 | 2 of 2 |" in text
    assert "| full ResNet-20 | 74.50 ± 0.71 | 76.00 ± 0.00 | -1.50 ± 0.71 | 0 of 2 |" in text
    assert "at 2 of 4 budgets" in text and text.rstrip().endswith("not met.")  # 10 % and 50 %; 25 % is +0.4
    l5[0]["budgets"][1]["picks"]["ST++"]["test_top1"] = 70.5
    assert "at 3 of 4 budgets" in "\n".join(setting_comparison(l5, l2))
    assert setting_comparison(l5, [seed_record(3, "λ 2", [0.0] * 4, 0.0)]) == []


def test_a_lever_is_screened_against_the_setting_it_changes_by_the_written_rule():
    """It goes on if it closes at least half of a short budget's gap (the base's mean shortfall to the fair front over
    its seeds) and costs no budget more than 0.5 points."""

    def seed_record(seed: int, setting: str, st: list[float], front: list[float], full: float) -> dict:
        run = f"{setting}_seed{seed}"
        budgets = [
            {"budget": share, "budget_name": "", "picks": {"ST++": {"test_top1": a}, "from scratch": {"test_top1": b}}}
            for share, a, b in zip((0.1, 0.25, 0.5, 1.0), st, front, strict=True)
        ]
        return {"seed": seed, "st_setting": setting, "st_network": f"ST++ ({setting})", "st_run": run,
                "budgets": budgets, "networks": {run: {"top1": full}}}  # fmt: skip

    front = [60.0, 70.0, 72.0, 73.0]
    base = [  # short at 10 % (-0.3 in the mean) and 25 % (-0.6); ahead at 50 and 100 %
        seed_record(seed, "l2", [59.7 + d, 69.4 + d, 73.5, 74.5], front, 75.0)
        for seed, d in ((1, 0.0), (2, 0.1), (3, -0.1))
    ]
    assert base_setting("l2_sandwich", ["l5", "l2"]) == "l2" and base_setting("l2_x_y", ["l2"]) is None
    assert base_setting("l20_sandwich", ["l2"]) is None

    closes = lever_screen(base, [seed_record(1, "l2_sandwich", [59.8, 69.7, 73.2, 74.3], front, 74.8)])
    assert [b["gap"] for b in closes["budgets"]] == [0.3, 0.6, 0.0, 0.0]
    assert closes["closes"] == ["0.25"] and closes["costs"] == [] and closes["goes_on"]  # +0.3 of 0.6; +0.1 of 0.3
    text = "\n".join(lever_table(closes))
    assert "| 25 % | -0.60 ± 0.10 | 0.60 | 69.70 | 69.40 | 0.30 | -0.30 | short |" in text
    assert "| full ResNet-20 | | | 74.80 | 75.00 | -0.20 | | |" in text
    assert text.rstrip().endswith("By the rule: goes on to seeds 2 and 3.")

    costly = lever_screen(base, [seed_record(1, "l2_bias0.5", [60.5, 70.5, 72.9, 74.4], front, 74.0)])
    assert costly["closes"] == ["0.1", "0.25"] and costly["costs"] == ["0.5"] and not costly["goes_on"]
    nothing = lever_screen(base, [seed_record(1, "l2_floor0.05", [59.7, 69.5, 73.5, 74.5], front, 75.0)])
    assert nothing["closes"] == [] and not nothing["goes_on"]
    assert "no short budget" in "\n".join(lever_table(nothing))

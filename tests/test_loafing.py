"""Loafing analysis: FLOP counting, sub-network evaluation, the ``stim-hf loafing`` command."""

import csv
import functools
import json

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT, make_tensor_dataset

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments, find_residual_stages, subnet_from_depths
from stim_hf.analysis.flops import count_flops, subnet_flop_shares
from stim_hf.cli import main as cli_main
from stim_hf.cli.train import parse_train_args
from stim_hf.errors import ConfigError
from stim_hf.method.batchnorm import batchnorm_layers
from stim_hf.tools.loafing import (
    CSV_COLUMNS,
    evaluate_model,
    fixed_eval_subnets,
    loafing_summary,
    main,
    parse_loafing_args,
    stage_sweep_subnets,
    subnet_batchnorm_statistics,
)

DATA_ARGS = ["--dataset_name", "sklearn:digits", "--image_size", "16", "--max_eval_samples", "64"]


_tensor_dataset = functools.partial(make_tensor_dataset, n=32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny ResNet-14 checkpoints (common training and ST++), trained for two steps each."""
    from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification

    root = tmp_path_factory.mktemp("ckpts")
    paths = []
    for method in ("ct", "stpp"):
        torch.manual_seed(0)
        model = CifarResNetForImageClassification(CifarResNetConfig(depth=14, widths=[8, 16, 32], num_labels=10))
        args = StimulativeTrainingArguments(
            output_dir=str(root / f"run_{method}"),
            stim_method=method,
            per_device_train_batch_size=16,
            learning_rate=0.05,
            optim="sgd",
            max_steps=2,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=7,
        )
        StimulativeTrainer(model=model, args=args, train_dataset=_tensor_dataset()).train()
        model.save_pretrained(root / method)
        paths.append(str(root / method))
    return paths


def _conv_macs(c_in, c_out, kernel, side):
    return c_in * c_out * kernel * kernel * side * side


def test_flops_of_full_network_match_hand_count(tiny_cifar_resnet):
    model = tiny_cifar_resnet(depth=14, widths=(8, 16, 32))  # 2 blocks per stage, projection shortcuts
    side = 16
    macs = _conv_macs(3, 8, 3, side)  # stem
    macs += 4 * _conv_macs(8, 8, 3, side)  # stage 0: two blocks, two 3x3 convs each
    for c_in, c_out, out_side in ((8, 16, side // 2), (16, 32, side // 4)):
        macs += _conv_macs(c_in, c_out, 3, out_side) + _conv_macs(c_out, c_out, 3, out_side)  # block 0
        macs += _conv_macs(c_in, c_out, 1, out_side)  # its 1x1 projection shortcut
        macs += 2 * _conv_macs(c_out, c_out, 3, out_side)  # block 1
    macs += 32 * 10  # classifier
    example = torch.randn(3, 3, side, side)
    assert count_flops(model, example) == 2 * macs  # per image, whatever the batch

    stages = find_residual_stages(model)
    subnet = subnet_from_depths(stages, [1, 2, 1])
    dropped = 2 * (2 * _conv_macs(8, 8, 3, side) + 2 * _conv_macs(32, 32, 3, side // 4))
    full, counts, shares = subnet_flop_shares(model, example, stages, [subnet])
    assert full == 2 * macs and counts == [2 * macs - dropped]
    assert shares[0] == pytest.approx((2 * macs - dropped) / (2 * macs))
    assert model.training  # mode restored


def test_fixed_subnets_match_trainer_and_sweep(tmp_path, tiny_cifar_resnet):
    model = tiny_cifar_resnet(depth=20)
    stages = find_residual_stages(model)
    args = StimulativeTrainingArguments(output_dir=str(tmp_path), stim_method="stpp", seed=11, report_to="none")
    trainer = StimulativeTrainer(model=model, args=args)
    assert fixed_eval_subnets(stages, 5, seed=11) == trainer.fixed_subnets(5)
    assert fixed_eval_subnets(stages, 5, seed=11) != fixed_eval_subnets(stages, 5, seed=12)
    subset = fixed_eval_subnets(stages, 5, seed=11, rule="subset")
    assert all(not s.is_full for s in subset) and len(set(subset)) == 5
    sweep = stage_sweep_subnets(stages, 1)
    assert [s.depths for s in sweep] == [(3, 1, 3), (3, 2, 3)]
    assert [s.depths for s in stage_sweep_subnets(stages, 0, [1, 1, 0])] == [(2, 3, 3)]
    with pytest.raises(ConfigError, match="out of range"):
        stage_sweep_subnets(stages, 3)


def test_evaluate_model_matches_manual_loop(tiny_cifar_resnet):
    model = tiny_cifar_resnet()
    stages = find_residual_stages(model)
    subnet = subnet_from_depths(stages, [1, 1, 2])
    data = _tensor_dataset(n=24)
    batches = [
        {"pixel_values": data[i : i + 8]["pixel_values"], "labels": data[i : i + 8]["labels"]} for i in (0, 8, 16)
    ]
    result = evaluate_model(model, batches, stages, subnet)
    model.eval()
    with torch.no_grad():
        from stim_hf.method import use_subnet

        with use_subnet(stages, subnet):
            logits = model(pixel_values=data[:]["pixel_values"]).logits
    expected = (logits.argmax(-1) == data[:]["labels"]).float().mean().item()
    assert result["accuracy"] == pytest.approx(expected) and result["num_samples"] == 24
    assert result["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, data[:]["labels"]).item(), rel=1e-5
    )


def test_subnet_batchnorm_statistics_are_restored(tiny_cifar_resnet):
    model = tiny_cifar_resnet()
    stages = find_residual_stages(model)
    subnet = subnet_from_depths(stages, [1, 1, 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _tensor_dataset(n=16)
    batches = [{"pixel_values": data[:]["pixel_values"], "labels": data[:]["labels"]}]
    with subnet_batchnorm_statistics(model, batches, 16, stages, subnet) as seen:
        assert seen == 16
        stem_bn = batchnorm_layers(model)[0]
        assert not torch.equal(stem_bn.running_mean, before["resnet.stem.bn.running_mean"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_loafing_summary_definition():
    summary = loafing_summary(0.8, [0.2, 0.4, 0.6])
    assert summary["subnet_accuracy_mean"] == pytest.approx(0.4)
    assert summary["relative_subnet_accuracy"] == pytest.approx(0.5)
    assert summary["loafing_gap"] == pytest.approx(0.5)
    assert (summary["subnet_accuracy_min"], summary["subnet_accuracy_max"]) == (0.2, 0.6)
    assert loafing_summary(0.8, [])["loafing_gap"] is None
    assert "loafing_gap_bn_recalibrated" in loafing_summary(0.5, [0.5], suffix="_bn_recalibrated")


def test_loafing_command_writes_report(checkpoints, tmp_path, capsys):
    out = tmp_path / "report"
    argv = [*checkpoints, "--num-subnets", "3", "--seed", "5", "--sweep-stage", "2", "--output-dir", str(out)]
    argv += ["--recalibrate-bn", "40"]
    assert cli_main(["loafing", *argv, *DATA_ARGS, "--labels", "CT", "ST++", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| CT |" in printed and "sub-net mean (inherited BN)" in printed
    assert "re-estimated for each on 40 training images" in printed.splitlines()[0]
    report = json.loads((out / "loafing.json").read_text())
    assert (out / "loafing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    networks = report["networks"]
    assert [n["kind"] for n in networks] == ["full", "sampled", "sampled", "sampled", "sweep"]
    assert networks[0]["flop_share"] == 1.0 and networks[0]["depths"] == [2, 2, 2]
    assert all(0 < n["flop_share"] < 1 for n in networks[1:])
    assert networks[-1]["depths"] == [2, 2, 1]
    assert report["settings"]["num_eval_images"] == 64 and report["settings"]["num_classes"] == 10
    assert report["settings"]["recalibrate_bn"] == 40

    assert [c["label"] for c in report["checkpoints"]] == ["CT", "ST++"]
    for checkpoint in report["checkpoints"]:
        assert [r["network"] for r in checkpoint["results"]] == [n["name"] for n in networks]
        summary = checkpoint["summary"]
        full = checkpoint["results"][0]
        assert full["accuracy"] == full["accuracy_inherited_bn"]  # the full network as trained
        for suffix in ("", "_inherited_bn"):
            sampled = [
                r[f"accuracy{suffix}"]
                for r, n in zip(checkpoint["results"], networks, strict=True)
                if n["kind"] == "sampled"
            ]
            assert summary[f"subnet_accuracy_mean{suffix}"] == pytest.approx(np.mean(sampled))
            assert summary[f"full_accuracy{suffix}"] == full["accuracy"]
            if full["accuracy"] > 0:
                gap = 1 - np.mean(sampled) / full["accuracy"]
                assert summary[f"loafing_gap{suffix}"] == pytest.approx(gap)

    # The same sub-networks for both checkpoints, the ones of the trainer with that seed.
    rows = list(csv.DictReader((out / "loafing.csv").open()))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 2 * len(networks)
    per_checkpoint = {
        label: [(r["network"], r["kept"]) for r in rows if r["checkpoint"] == label] for label in ("CT", "ST++")
    }
    assert per_checkpoint["CT"] == per_checkpoint["ST++"]
    from stim_hf.tools.loafing import load_checkpoint

    stages = find_residual_stages(load_checkpoint(checkpoints[0]))
    expected = fixed_eval_subnets(stages, 3, seed=5)
    assert [n["kept"] for n in networks[1:4]] == [[list(k) for k in s.kept] for s in expected]
    assert all(r["accuracy_inherited_bn"] != "" for r in rows)


def test_recalibrate_bn_0_gives_the_inherited_figures(checkpoints, tmp_path, capsys):
    """Opting out reports what the re-estimating run reports beside its figures: the full network's statistics."""
    base = [checkpoints[1], "--num-subnets", "2", "--no-progress", *DATA_ARGS]
    both = main([*base, "--recalibrate-bn", "48", "--output-dir", str(tmp_path / "both")])
    capsys.readouterr()
    inherited = main([*base, "--recalibrate-bn", "0", "--output-dir", str(tmp_path / "inherited")])
    header = capsys.readouterr().out.splitlines()[1]
    assert header.startswith("| checkpoint | full |") and "inherited BN" not in header  # one set of columns
    assert inherited["settings"]["recalibrate_bn"] == 0
    assert "full network's BatchNorm statistics" in inherited["settings"]["bn_statistics"]
    for row, old in zip(both["checkpoints"][0]["results"], inherited["checkpoints"][0]["results"], strict=True):
        assert old["accuracy"] == old["accuracy_inherited_bn"] == row["accuracy_inherited_bn"]
        assert np.isfinite(row["loss"]) and 0.0 <= row["accuracy"] <= 1.0
    assert both["checkpoints"][0]["results"][0]["accuracy"] == inherited["checkpoints"][0]["results"][0]["accuracy"]


def test_loafing_arguments_errors(tmp_path):
    with pytest.raises(ConfigError, match="one per checkpoint"):
        parse_loafing_args(["a", "b", "--labels", "x", *DATA_ARGS])
    with pytest.raises(ConfigError, match=r"^no data was given; give the images to evaluate with validation_file"):
        parse_loafing_args(["a"])
    (tmp_path / "images").mkdir()
    both = ["--validation_dir", str(tmp_path / "images"), "--validation_file", str(tmp_path / "x.parquet")]
    with pytest.raises(ConfigError, match=r"^validation_file and validation_dir are both set; give the images"):
        parse_loafing_args(["a", *both])
    with pytest.raises(ConfigError, match="sampling"):
        parse_loafing_args(["a", "--sampling", "random", *DATA_ARGS])
    with pytest.raises(ConfigError, match="not a model directory"):
        main([str(tmp_path), "--no-progress", *DATA_ARGS])


def test_recipe_config_gives_defaults(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model_type: cifar_resnet\ndataset_name: sklearn:digits\nimage_size: 16\nseed: 3\n"
        "subnet_sampling: subset\nsample_space: [1, 1, 0]\nnum_eval_subnets: 5\nlearning_rate: 0.1\n"
    )
    args, data_args, checkpoints = parse_loafing_args(["ckpt", "--config", str(recipe), "--seed", "4"])
    assert checkpoints == ["ckpt"]
    assert (args.seed, args.sampling, args.sample_space, args.num_subnets) == (4, "subset", "1,1,0", 5)
    assert (data_args.dataset_name, data_args.image_size) == ("sklearn:digits", 16)


def test_st_recipe_draws_the_trainers_subnets(tmp_path, tiny_cifar_resnet):
    """An ST recipe sets stim_method: st but not subnet_sampling: loafing takes the preset's subset rule."""
    recipe = yaml.safe_load((REPO_ROOT / "configs" / "cifar10_resnet56_st.yaml").read_text())
    assert recipe["stim_method"] == "st" and "subnet_sampling" not in recipe and "sample_space" not in recipe
    del recipe["train_file"], recipe["validation_file"]
    recipe.update(dataset_name="sklearn:digits", image_size=16, max_eval_samples=64, output_dir=str(tmp_path / "run"))
    recipe.update(report_to="none", eval_strategy="no", save_strategy="no", seed=9)
    path = tmp_path / "st.yaml"
    path.write_text(yaml.safe_dump(recipe))
    model = tiny_cifar_resnet()  # 2 blocks per stage: subset sampling may keep block 1 without block 0
    model.save_pretrained(tmp_path / "ckpt")
    _, _, training_args = parse_train_args([str(path)])
    expected = StimulativeTrainer(model=model, args=training_args).fixed_subnets(recipe["num_eval_subnets"])
    assert any(kept != tuple(range(len(kept))) for s in expected for kept in s.kept), "not subset sampling"

    args, _, _ = parse_loafing_args([str(tmp_path / "ckpt"), "--config", str(path)])
    assert (args.sampling, args.sample_space, args.num_subnets, args.seed) == ("subset", "full", 8, 9)
    report = main(
        [str(tmp_path / "ckpt"), "--config", str(path), "--output-dir", str(tmp_path / "out"), "--no-progress"]
    )
    sampled = [n["kept"] for n in report["networks"] if n["kind"] == "sampled"]
    assert sampled == [[list(k) for k in s.kept] for s in expected]


def test_loafing_argument_errors_are_one_line(checkpoints, capsys):
    cases = [
        (["--num-subnets", "x"], "--num-subnets: invalid int value: 'x'"),
        (["--num-subnet", "3"], "unknown command-line argument(s) ['--num-subnet'] (did you mean: '--num-subnet' ->"),
        (["--sample-space", "-1,0,0"], "sample_space='-1,0,0' is not valid"),
    ]
    for extra, message in cases:
        assert cli_main(["loafing", checkpoints[0], *extra, *DATA_ARGS]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("stim-hf: error: ") and err.count("\n") == 1 and message in err, err


@pytest.fixture(scope="module")
def digits_parquet(tmp_path_factory):
    """64 digits images as a parquet file with an Image and a ClassLabel column, as a user's test split."""
    from stim_hf.data.builtin_datasets import load_builtin_dataset

    path = tmp_path_factory.mktemp("data") / "test.parquet"
    load_builtin_dataset("sklearn:digits")["train"].select(range(64)).to_parquet(str(path))
    return str(path)


def test_validation_data_alone_is_enough_without_re_estimation(checkpoints, digits_parquet, tmp_path, capfd):
    """No training source: evaluated with the full network's statistics, and one line says how to re-estimate."""
    argv = ["loafing", checkpoints[0], "--validation_file", digits_parquet, "--image_size", "16", "--num-subnets", "2"]
    assert cli_main([*argv, "--output-dir", str(tmp_path / "a"), "--no-progress"]) == 0
    captured = capfd.readouterr()
    notes = [line for line in captured.err.splitlines() if "no training images given" in line]
    assert len(notes) == 1 and "--train_file, --train_dir or --dataset_name" in notes[0], captured.err
    report = json.loads((tmp_path / "a" / "loafing.json").read_text())
    assert report["settings"]["recalibrate_bn"] == 0 and report["settings"]["num_eval_images"] == 64
    assert all(r["accuracy"] == r["accuracy_inherited_bn"] for r in report["checkpoints"][0]["results"])

    # Asking for re-estimation without training images: one line naming the fix, before any progress bar.
    assert cli_main([*argv, "--recalibrate-bn", "100", "--output-dir", str(tmp_path / "b")]) == 2
    err = capfd.readouterr().err
    assert err.startswith("stim-hf: error: --recalibrate-bn 100 re-estimates BatchNorm statistics") and err.endswith(
        "\n"
    )
    assert err.count("\n") == 1 and "--recalibrate-bn 0" in err, err
    assert not (tmp_path / "b").exists()

"""Exporting sub-networks as standalone models: same logits, Auto-class reload, parameters, CLI, errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_families import IMAGE_SIZE, build
from torch import nn
from transformers import AutoModelForImageClassification

from stim_hf import cli
from stim_hf.errors import ConfigError, ModelStructureError
from stim_hf.method import Subnet, find_residual_stages, subnet_from_depths, use_subnet
from stim_hf.method.batchnorm import batchnorm_layers
from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification
from stim_hf.tools.export import build_subnet_model, export_subnet
from stim_hf.tools.export_cli import parse_export_args

# Family -> depths to export (shallower than the full model in every stage that can lose blocks).
EXPORTS = {
    "cifar_resnet": [1, 2, 1],
    "hf_resnet": [1, 2, 1],
    "hf_regnet": [2, 1, 1],
    "hf_convnext": [1, 2, 1],
    "hf_convnextv2": [2, 1, 1],
    "hf_vit": [2],
    "hf_deit": [1],
    "hf_swin": [1, 2, 1],
    "timm_resnet": [1, 2, 1, 1],
    "timm_convnext": [1, 2, 1, 2],
}
DEPTH_FIELDS = {"cifar_resnet": "blocks_per_stage", "hf_vit": "num_hidden_layers", "hf_deit": "num_hidden_layers"}


def perturbed(name: str) -> nn.Module:
    """A tiny model whose every weight and BatchNorm statistic is random, so every block matters.

    (ConvNeXt's layer scale starts at 1e-6 and BatchNorm statistics at 0 / 1: left alone, dropping a
    block would hardly change the logits, and a wrong weight mapping could go unnoticed.)
    """
    return perturb(build(name))


def perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    """``model`` with random weights and BatchNorm statistics added (every layer matters), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        for layer in batchnorm_layers(model):
            layer.running_mean.normal_(0, 0.1, generator=generator)
            layer.running_var.uniform_(0.5, 1.5, generator=generator)
    return model.eval()


def block_parameters(stages, subnet) -> int:
    return sum(
        p.numel()
        for stage, kept in zip(stages, subnet.kept, strict=True)
        for i, block in enumerate(stage.container)
        if i not in kept
        for p in block.parameters()
    )


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_matches_subnet_and_reloads_with_auto_class(tmp_path, name):
    model = perturbed(name)
    stages = find_residual_stages(model)
    subnet = subnet_from_depths(stages, EXPORTS[name])
    x = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        full = model(pixel_values=x).logits
        with use_subnet(stages, subnet):
            inside = model(pixel_values=x).logits
    assert not torch.allclose(full, inside, atol=1e-3), "dropping blocks should change the logits"

    exported = export_subnet(model, EXPORTS[name], tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").is_file()
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "export").eval()
    assert type(reloaded) is type(model)
    field = DEPTH_FIELDS.get(name, "model_args" if name.startswith("timm") else "depths")
    value = getattr(reloaded.config, field)
    assert (value["layers" if name == "timm_resnet" else "depths"] if field == "model_args" else value) in (
        EXPORTS[name],
        EXPORTS[name][0],
    )
    with torch.no_grad():
        for candidate in (exported, reloaded):
            torch.testing.assert_close(candidate(pixel_values=x).logits, inside, rtol=0, atol=1e-5)
    assert [s.num_blocks for s in find_residual_stages(reloaded)] == EXPORTS[name]

    full_count = sum(p.numel() for p in model.parameters())
    count = sum(p.numel() for p in reloaded.parameters())
    assert count < full_count
    assert count == full_count - block_parameters(stages, subnet)
    info = json.loads((tmp_path / "export" / "export_info.json").read_text())
    assert info["num_parameters"] == count and info["full_num_parameters"] == full_count
    # The source model is untouched.
    assert [s.num_blocks for s in find_residual_stages(model)] == list(subnet.num_blocks)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("hf_mobilenet_v2", r"MobileNetV2's config has no per-stage depth.*use_subnet"),
        ("timm_efficientnet", r"timm builds EfficientNet / MobileNetV3.*use_subnet"),
        ("timm_mobilenetv3", r"timm builds EfficientNet / MobileNetV3.*use_subnet"),
    ],
)
def test_families_without_depth_config_are_refused(tmp_path, name, message):
    model = build(name).eval()
    depths = [s.num_blocks for s in find_residual_stages(model)]
    with pytest.raises(ModelStructureError, match=message):
        export_subnet(model, depths, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("name", ["hf_regnet", "timm_resnet"])
def test_the_smallest_sub_network_exports_where_it_keeps_no_skippable_block(name):
    # Each stage's first block changes shape: the sub-network keeping only those has nothing left to drop, and is
    # still a model to deploy (the search's cheapest point); it used to be refused as "no sub-network to train".
    model = perturbed(name).eval()
    stages = find_residual_stages(model)
    ones = [1] * len(stages)
    smallest = build_subnet_model(model, ones)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), use_subnet(stages, subnet_from_depths(stages, ones)):
        torch.testing.assert_close(smallest(pixel_values=x).logits, model(pixel_values=x).logits)


def test_export_errors_name_the_problem(tmp_path):
    model = perturbed("cifar_resnet")
    stages = find_residual_stages(model)
    with pytest.raises(ConfigError, match=r"depth 3 for stage 1 .* must keep between 1 and 2"):
        export_subnet(model, [1, 3, 1], tmp_path / "a")
    with pytest.raises(ConfigError, match=r"has 2 entries but the model has 3 residual stages"):
        export_subnet(model, [1, 1], tmp_path / "a")
    with pytest.raises(ConfigError, match=r"not a prefix.*depths=\[2, 1, 1\]"):
        export_subnet(model, Subnet(kept=((0, 1), (1,), (0,)), num_blocks=(2, 2, 2)), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"checkpoint directory '.*missing' does not exist"):
        export_subnet(str(tmp_path / "missing"), [1, 1, 1], tmp_path / "a")
    model.save_pretrained(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"is the checkpoint itself"):
        export_subnet(tmp_path / "run", [1, 1, 1], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"--recalibrate-bn 10 re-estimates .* no training data was given; add"):
        export_subnet(model, [1, 1, 1], tmp_path / "a", recalibrate_bn=10)
    with pytest.raises(ConfigError, match=r"--evaluate needs data: give the validation data"):
        export_subnet(model, [1, 1, 1], tmp_path / "a", evaluate=True)
    with pytest.raises(ConfigError, match=r"--input-size 4 must be an integer >= 8"):
        export_subnet(model, [1, 1, 1], tmp_path / "a", input_size=4)
    with pytest.raises(ConfigError, match=r"--batch-size 0 must be an integer >= 1"):  # was torch's traceback
        export_subnet(model, [1, 1, 1], tmp_path / "a", batch_size=0)
    # A Subnet that keeps prefixes is accepted, as are the full depths (a plain copy).
    same = build_subnet_model(model, subnet_from_depths(stages, [2, 1, 2]))
    assert [s.num_blocks for s in find_residual_stages(same)] == [2, 1, 2]
    assert sum(p.numel() for p in build_subnet_model(model, [2, 2, 2]).parameters()) == sum(
        p.numel() for p in model.parameters()
    )


def test_cli_export_with_bn_recalibration_and_evaluation(tmp_path, capsys):
    torch.manual_seed(0)
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=14, widths=[8, 16, 32], num_labels=10))
    checkpoint, output = tmp_path / "run", tmp_path / "exported"
    model.save_pretrained(checkpoint)
    argv = ["export", str(checkpoint), "--depths", "1,2,1", "--output", str(output), "--recalibrate-bn", "64"]
    argv += ["--dataset_name", "sklearn:digits", "--image_size", "16", "--evaluate", "--batch_size", "32"]
    assert cli.main(argv) == 0
    assert "exported depths=1,2,1" in capsys.readouterr().out

    card = (output / "README.md").read_text()
    for text in (
        f"# Sub-network depths=1,2,1 of {checkpoint}",
        "| `resnet.stages.0.layers` | 1 (block 0) | 2 |",
        "| `resnet.stages.1.layers` | 2 (blocks 0-1) | 2 |",
        "of the full model's",
        "Re-estimated for this sub-network on 64 training images of sklearn:digits",
        "| this sub-network (depths=1,2,1) |",
        "| full model |",
        'model="path/to/this/folder", trust_remote_code=True',  # loads without stim_hf: its code is in the folder
        "stim-hf export",
    ):
        assert text in card, text
    info = json.loads((output / "export_info.json").read_text())
    assert info["bn_recalibration_samples"] == 64
    assert info["metrics"]["num_samples"] == info["full_metrics"]["num_samples"] > 0
    assert 0.0 <= info["metrics"]["accuracy"] <= 1.0

    reloaded = AutoModelForImageClassification.from_pretrained(output)
    assert reloaded.config.blocks_per_stage == [1, 2, 1] and reloaded.config.depth == 10
    plain = build_subnet_model(model, [1, 2, 1])
    # Recalibration changed the BatchNorm statistics of the export (not the weights).
    assert not torch.allclose(reloaded.resnet.stem.bn.running_mean, plain.resnet.stem.bn.running_mean)
    torch.testing.assert_close(reloaded.resnet.stem.conv.weight, plain.resnet.stem.conv.weight)


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    status = cli.main(["export", str(tmp_path / "nope"), "--depths", "1,1,1", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("stim-hf: error: checkpoint directory") and "\n" not in err
    assert cli.main(["export", str(tmp_path), "--depths", "1,x", "--output", str(tmp_path / "out")]) == 2
    assert "must be comma-separated integers" in capsys.readouterr().err


def test_recipe_supplies_data_arguments_and_seed(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model_type: cifar_resnet\ndataset_name: sklearn:digits\ntrain_val_split: 0.2\nimage_size: 16\nseed: 7\n"
        "subnet_bn_recalibration_samples: 512\nmax_eval_samples: null\n"
    )
    checkpoint, args, data_args = parse_export_args(
        ["run", "--depths", "1,1,1", "--output", "out", "--config", str(recipe), "--image_size", "24"]
    )
    assert checkpoint == "run" and args.seed == 7 and args.depths == "1,1,1" and args.recalibrate_bn == 512
    assert data_args.dataset_name == "sklearn:digits" and data_args.train_val_split == 0.2
    assert data_args.image_size == 24  # the command line wins over the recipe
    assert parse_export_args(["run", "--depths", "1", "--output", "out"])[2] is None
    with pytest.raises(ConfigError, match="needs --output"):
        parse_export_args(["run", "--depths", "1"])


def _error_line(stderr: str) -> str:
    """The one ``stim-hf: error:`` line of the CLI's stderr (progress bars of model loading aside)."""
    lines = [line for line in stderr.splitlines() if "stim-hf: error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def _saved_checkpoint(path):
    """A tiny CIFAR ResNet-14 (2 blocks per stage) saved with save_pretrained at ``path``."""
    torch.manual_seed(0)
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=14, widths=[8, 16, 32], num_labels=10))
    model.save_pretrained(path)
    return model


def test_existing_output_needs_overwrite(tmp_path, capsys):
    checkpoint, output = tmp_path / "run", tmp_path / "exported"
    _saved_checkpoint(checkpoint)
    export_subnet(checkpoint, [1, 1, 1], output)
    (output / "preprocessor_config.json").write_text("{}")  # as if an earlier source had one
    with pytest.raises(ConfigError, match=r"'.*exported' already exists and is not empty.*--overwrite"):
        export_subnet(checkpoint, [2, 1, 1], output)
    assert json.loads((output / "config.json").read_text())["blocks_per_stage"] == [1, 1, 1]

    export_subnet(checkpoint, [2, 1, 1], output, overwrite=True)
    assert json.loads((output / "config.json").read_text())["blocks_per_stage"] == [2, 1, 1]
    assert not (output / "preprocessor_config.json").exists()  # not of this source: removed

    argv = ["export", str(checkpoint), "--depths", "1,2,1", "--output", str(output)]
    assert cli.main(argv) == 2
    assert "already exists and is not empty" in _error_line(capsys.readouterr().err)
    assert cli.main([*argv, "--overwrite"]) == 0
    assert json.loads((output / "config.json").read_text())["blocks_per_stage"] == [1, 2, 1]
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"'.*file' is a file"):
        export_subnet(checkpoint, [1, 1, 1], tmp_path / "file", overwrite=True)


@pytest.mark.parametrize("markers", [("stim_hf_checkpoint.json",), ("trainer_state.json", "optimizer.pt")])
def test_training_checkpoint_is_never_overwritten(tmp_path, capsys, markers):
    run = tmp_path / "run"
    _saved_checkpoint(run)
    target = run / "checkpoint-184"
    _saved_checkpoint(target)
    for name in markers:
        (target / name).write_text("{}")
    weights = (target / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"'.*checkpoint-184' is a training checkpoint.*not even with --overwrite"):
        export_subnet(run, [1, 1, 1], target, overwrite=True)
    argv = ["export", str(run), "--depths", "1,1,1", "--output", str(target), "--overwrite"]
    assert cli.main(argv) == 2
    assert "is a training checkpoint" in capsys.readouterr().err
    assert (target / "model.safetensors").read_bytes() == weights
    code = ["configuration_cifar_resnet.py", "modeling_cifar_resnet.py"]  # saved beside the weights
    assert sorted(p.name for p in target.iterdir()) == sorted(["config.json", "model.safetensors", *code, *markers])


def test_cli_argument_errors_are_one_line_with_suggestions(tmp_path, capsys):
    checkpoint = tmp_path / "run"
    _saved_checkpoint(checkpoint)
    base = ["export", str(checkpoint), "--output", str(tmp_path / "out")]
    cases = [
        (["--depths", "1,1,1", "--recalibrate-bn", "abc"], r"--recalibrate-bn: invalid int value: 'abc'"),
        (
            ["--depth", "1,1,1"],
            r"unknown command-line argument\(s\) \['--depth'\] \(did you mean: '--depth' -> '(--)?depths'",
        ),
        # A value starting with '-' is the option's value, so it reaches the depths check.
        (["--depths", "-1,2,2"], r"depth -1 for stage 0 .* must keep between 1 and 2"),
        (["--depths=-1,2,2"], r"depth -1 for stage 0 .* must keep between 1 and 2"),
        (["--depths", "--evaluate"], r"argument --depths: expected one argument"),
    ]
    for extra, message in cases:
        assert cli.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert re.search(message, _error_line(err)), err
        assert "usage:" not in err
    assert not (tmp_path / "out").exists()


def _export_at_12_px(family: str, tmp_path):
    """``family``'s perturbed model (trained size 16) exported at 12 px with evaluation: (folder, export_info)."""
    from stim_hf.data.image_datasets import EvaluationDataArguments

    checkpoint, output = tmp_path / "run", tmp_path / "exported"
    perturbed(family).save_pretrained(checkpoint)  # varied predictions, not one class for every image
    data_args = EvaluationDataArguments(
        dataset_name="sklearn:digits", train_val_split=0.2, image_size=16, max_eval_samples=300
    )
    export_subnet(
        checkpoint, EXPORTS[family], output, recalibrate_bn=64, data_args=data_args, evaluate=True, input_size=12,
        seed=42,
    )  # fmt: skip
    return output, json.loads((output / "export_info.json").read_text())


def test_export_at_an_input_size_resizes_as_training_did_and_works_with_a_pipeline(tmp_path):
    """A CIFAR ResNet export at --input-size resizes its input itself, exactly as training resized the
    sub-network's batch; its processor keeps the trained size, and pipeline() predicts what the export's
    evaluation did."""
    from test_train_job import assert_pipeline_matches_evaluation

    from stim_hf.method.running import resize_input

    output, info = _export_at_12_px("cifar_resnet", tmp_path)
    assert info["input_size"] == 12 and info["input_resized_by"] == "model" and info["metrics"]["num_samples"] == 300
    assert json.loads((output / "config.json").read_text())["resize_input_to"] == 12
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 16, "width": 16} and info["image_processor_size"] == 16
    card = (output / "README.md").read_text()
    assert 'pipeline("image-classification"' in card and "to 12 px itself" in card
    assert_pipeline_matches_evaluation(output, info["metrics"]["accuracy"], max_eval_samples=300)
    # What the network sees is training's resize of the 16 px batch (bilinear, not antialiased), not a 12 px crop.
    model = AutoModelForImageClassification.from_pretrained(output).eval()
    batch = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        inside = model(pixel_values=batch).logits
        model.config.resize_input_to = None
        trained_way = model(pixel_values=resize_input(batch, 12)).logits
        antialiased = model(pixel_values=torch.nn.functional.interpolate(batch, size=12, mode="bilinear",
                                                                       antialias=True)).logits  # fmt: skip
    torch.testing.assert_close(inside, trained_way)
    assert not torch.allclose(inside, antialiased, atol=1e-3)


def test_export_of_a_transformers_family_at_an_input_size_resizes_in_its_processor(tmp_path):
    """A family whose model cannot resize its own input (a transformers ResNet) gets a processor at --input-size."""
    from test_train_job import assert_pipeline_matches_evaluation

    output, info = _export_at_12_px("hf_resnet", tmp_path)
    assert info["input_size"] == 12 and info["input_resized_by"] == "image processor"
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 12, "width": 12} and processor["size"] == {"shortest_edge": 12}
    assert "resized without antialiasing" in (output / "README.md").read_text()
    assert_pipeline_matches_evaluation(output, info["metrics"]["accuracy"], input_size=12, max_eval_samples=300)


def test_input_size_is_refused_where_a_standalone_model_cannot_take_it(tmp_path):
    model = perturbed("hf_vit")
    with pytest.raises(ConfigError, match=r"--input-size 16: a standalone .* leave --input-size unset"):
        export_subnet(model, EXPORTS["hf_vit"], tmp_path / "a", input_size=16)
    assert not (tmp_path / "a").exists()


def test_evaluation_data_alone_exports_with_the_full_networks_statistics(tmp_path, capfd):
    """--validation_file without training data: --evaluate works, BatchNorm is inherited, a line says so."""
    from stim_hf.data.builtin_datasets import load_builtin_dataset

    test_file = tmp_path / "test.parquet"
    load_builtin_dataset("sklearn:digits")["train"].select(range(64)).to_parquet(str(test_file))
    checkpoint, output = tmp_path / "run", tmp_path / "exported"
    _saved_checkpoint(checkpoint)
    argv = ["export", str(checkpoint), "--depths", "1,2,1", "--validation_file", str(test_file), "--image_size", "16"]
    capfd.readouterr()  # the set-up's progress bars

    assert cli.main([*argv, "--output", str(tmp_path / "refused"), "--recalibrate-bn", "10"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("stim-hf: error: --recalibrate-bn 10 re-estimates BatchNorm statistics on training images")
    assert err.count("\n") == 1 and err.endswith("--recalibrate-bn 0 to keep the full network's statistics\n"), err
    assert not (tmp_path / "refused").exists()

    assert cli.main([*argv, "--output", str(output), "--evaluate"]) == 0
    captured = capfd.readouterr()
    assert "exported depths=1,2,1" in captured.out and "top-1" in captured.out
    notes = [line for line in captured.err.splitlines() if line.startswith("stim-hf export: no training images")]
    assert len(notes) == 1 and "--train_file, --train_dir or --dataset_name" in notes[0], captured.err
    # No transformers bars for loading and writing a small local model: the lines above are the whole output.
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err, captured.err
    info = json.loads((output / "export_info.json").read_text())
    assert info["bn_recalibration_samples"] == 0 and info["metrics"]["num_samples"] == 64
    assert json.loads((output / "preprocessor_config.json").read_text())["crop_size"] == {"height": 16, "width": 16}
    assert "Inherited from the full network" in (output / "README.md").read_text()

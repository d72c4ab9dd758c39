"""Fine-tuning an export (stim-hf finetune): KL from the frozen full network, the same folder written back safely."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from conftest import REPO_ROOT, fill_disk
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification, TrainerCallback, pipeline

import stim_hf  # noqa: F401  (registers the CIFAR ResNets with the Auto classes)
import stim_hf.tools.finetune as finetune_module
from stim_hf.cli import main as cli_main
from stim_hf.cli.train import main as train_main
from stim_hf.data.builtin_datasets import load_builtin_dataset
from stim_hf.data.image_datasets import DataArguments, load_image_datasets
from stim_hf.data.transforms import collate_image_batch, with_image_transforms
from stim_hf.errors import StorageError
from stim_hf.method import resize_input
from stim_hf.method.losses import kl_divergence
from stim_hf.tools.finetune import finetune_export
from stim_hf.tools.finetune_config import FinetuneArguments
from stim_hf.training.integrity import folder_problems, write_folder_manifest

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")
# Quick runs: 512 training images in batches of 32 (16 steps an epoch), 256 images to re-estimate BatchNorm.
QUICK = ["--max_train_samples", "512", "--batch-size", "32", "--recalibrate-bn", "256"]
# How far the sabotaged student's classifier favours class 0: far from the teacher, and learnable back.
SABOTAGE = 4.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A few steps of the quickstart (CIFAR ResNet-20, digits): the full network, the teacher."""
    out = tmp_path_factory.mktemp("finetune") / "quickstart"
    train_main([
        QUICKSTART, "--output_dir", str(out), "--max_steps", "4", "--save_strategy", "no", "--eval_strategy", "no",
        "--report_to", "none", "--num_eval_subnets", "0", "--disable_tqdm", "true",
    ])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def export(run, tmp_path_factory):
    """Its sub-network depths=1,2,2 exported for 12 px inputs, then sabotaged: the classifier's bias favours class 0
    by SABOTAGE logits, so the student starts far from the teacher and fine-tuning has a wide margin to show."""
    folder = tmp_path_factory.mktemp("exports") / "export"
    assert cli_main(["export", str(run), "--depths", "1,2,2", "--output", str(folder), "--config", QUICKSTART,
                     "--recalibrate-bn", "64", "--input-size", "12"]) == 0  # fmt: skip
    weights = load_file(str(folder / "model.safetensors"))
    weights["classifier.bias"][0] += SABOTAGE
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_folder_manifest(folder)  # changed on purpose: its hashes recorded again, else every reader refuses it
    return folder


def digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def copy_of(folder, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


@pytest.fixture(scope="module")
def fixed_batch():
    """64 validation images at the training size (16 px), as the teacher sees them."""
    data_args = DataArguments(dataset_name="sklearn:digits", train_val_split=0.2, image_size=16, augmentation="cifar")
    validation = load_image_datasets(data_args, seed=42)["validation"].select(range(64))
    dataset = with_image_transforms(validation, data_args, train=False)
    return collate_image_batch([dataset[i] for i in range(len(dataset))])["pixel_values"]


@torch.no_grad()
def kl_on(fixed_batch, teacher_dir, student_dir) -> float:
    teacher = AutoModelForImageClassification.from_pretrained(teacher_dir).eval()
    student = AutoModelForImageClassification.from_pretrained(student_dir).eval()
    return float(
        kl_divergence(
            teacher(pixel_values=fixed_batch).logits, student(pixel_values=resize_input(fixed_batch, 12)).logits
        )
    )


@pytest.fixture(scope="module")
def tuned(run, export, fixed_batch, tmp_path_factory):
    """The export fine-tuned in place for 1 epoch through the command line; what it was before, and what it printed."""
    folder = tmp_path_factory.mktemp("tuned") / "export"
    shutil.copytree(export, folder)
    before = {"files": digests(folder), "teacher": digests(run), "kl": kl_on(fixed_batch, run, folder)}
    before["weights"] = load_file(str(folder / "model.safetensors"))
    argv = ["finetune", str(folder), "--epochs", "1", "--config", QUICKSTART, "--learning-rate", "0.05", *QUICK]
    assert cli_main(argv) == 0
    return folder, before


# --------------------------------------------------------------------------------------------------
# The fine-tuned folder
# --------------------------------------------------------------------------------------------------


def test_the_folder_is_written_back_and_still_loads(tuned, run):
    folder, before = tuned
    assert set(digests(folder)) == set(before["files"])  # the same files, nothing left over
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir())  # no staging folder left
    manifest = json.loads((folder / "stim_hf_manifest.json").read_text())  # sealed again, with the new weights
    assert set(manifest["hashes"]) == set(before["files"]) - {"stim_hf_manifest.json"} and folder_problems(folder) == []
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert model.config.blocks_per_stage == [1, 2, 2]
    image = load_builtin_dataset("sklearn:digits")["train"][0]["image"]
    result = pipeline("image-classification", model=str(folder), device="cpu")(image)
    assert len(result) == 5 and {"label", "score"} <= set(result[0])


def test_the_student_changed_and_the_teacher_did_not(tuned, run):
    folder, before = tuned
    after = load_file(str(folder / "model.safetensors"))
    assert set(after) == set(before["weights"])
    changed = [k for k in after if after[k].is_floating_point() and not torch.equal(after[k], before["weights"][k])]
    assert "classifier.weight" in changed and any(k.startswith("resnet.stages.0") for k in changed)
    assert digests(run) == before["teacher"]


def test_the_kl_to_the_teacher_went_down(tuned, run, fixed_batch):
    folder, before = tuned
    after = kl_on(fixed_batch, run, folder)
    assert before["kl"] > 1.0  # the sabotaged student is far from the teacher
    assert after < before["kl"] / 4, (before["kl"], after)


def test_the_record_and_the_card_say_what_was_done(tuned, run):
    folder, _ = tuned
    info = json.loads((folder / "export_info.json").read_text())
    record = info["finetune"]
    assert record["epochs"] == 1 and record["steps"] == 16 and record["train_samples"] == 512
    assert record["learning_rate"] == 0.05 and record["ce_weight"] == 0.0 and record["loss"] == "KL(teacher || student)"
    assert record["teacher"] == str(run) and record["input_size"] == 12 and record["teacher_input_size"] == 16
    assert record["bn_recalibration_samples"] == 256 and record["seconds"] > 0
    assert record["after"]["kl_to_teacher"] < record["before"]["kl_to_teacher"] / 4
    assert info["metrics"]["accuracy"] == record["after"]["accuracy"]
    assert record["command"].startswith("stim-hf finetune ")
    card = ModelCard.load(folder / "README.md")
    assert "## Fine-tuning" in card.text and "fine-tuned for 1 epoch(s)" in card.text
    assert f"{100 * record['before']['accuracy']:.2f}%" in card.text
    assert f"{100 * record['after']['accuracy']:.2f}%" in card.text
    names = [result.metric_name for result in card.data.eval_results]
    assert any("fine-tuned 1 epoch(s)" in name for name in names)


def test_output_elsewhere_keeps_the_export_and_the_earlier_record(tuned, tmp_path):
    folder, _ = tuned
    kept = digests(folder)
    other = tmp_path / "other"
    data_args = DataArguments(dataset_name="sklearn:digits", train_val_split=0.2, image_size=16, max_train_samples=64)
    args = FinetuneArguments(epochs=1, output=str(other), ce_weight=0.5, batch_size=32, recalibrate_bn=0)
    result = finetune_export(folder, data_args, args)
    assert digests(folder) == kept
    record = json.loads((other / "export_info.json").read_text())["finetune"]
    assert record == json.loads(json.dumps(result.record))
    assert "0.5 * cross-entropy" in record["loss"] and record["bn_recalibration_samples"] == 0
    assert len(record["earlier"]) == 1 and record["earlier"][0]["learning_rate"] == 0.05
    assert "fine-tuned 1 time(s) before" in (other / "README.md").read_text()
    AutoModelForImageClassification.from_pretrained(other)


class _Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("simulated crash at step 2")


def test_a_run_that_fails_midway_leaves_the_export_intact(export, tmp_path):
    folder = copy_of(export, tmp_path)
    kept = digests(folder)
    data_args = DataArguments(dataset_name="sklearn:digits", train_val_split=0.2, image_size=16, max_train_samples=128)
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune_export(folder, data_args, FinetuneArguments(epochs=1, batch_size=32), callbacks=[_Crash()])
    assert digests(folder) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # the staging folder is gone
    AutoModelForImageClassification.from_pretrained(folder)


def test_a_full_disk_at_the_write_back_leaves_the_export_intact(export, small_disk):
    """The disk fills up while fine-tuning runs: the write-back fails with one line, the export as it was."""
    disk = small_disk("4m")
    folder = disk / "export"
    shutil.copytree(export, folder)
    kept = digests(folder)

    class FillTheDisk(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            fill_disk(disk)

    data_args = DataArguments(dataset_name="sklearn:digits", train_val_split=0.2, image_size=16, max_train_samples=128)
    with pytest.raises(StorageError) as raised:
        finetune_export(folder, data_args, FinetuneArguments(epochs=1, batch_size=32), callbacks=[FillTheDisk()])
    message = str(raised.value)
    assert message.startswith(f"could not write the fine-tuned model to '{folder}': No space left on device (ENOSPC"), (
        message
    )
    assert f"the partial folder '{disk / '.export.finetune' / 'model'}' was removed" in message
    assert f"the export '{folder}' is as it was;" in message and "\n" not in message
    assert digests(folder) == kept and folder_problems(folder) == []
    assert sorted(p.name for p in disk.iterdir()) == ["export", "filler"]  # the staging folder is gone


# --------------------------------------------------------------------------------------------------
# Bad inputs: one line, before any training
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(finetune_module.FinetuneTrainer, "train", refuse)


def _refused(capsys, argv) -> str:
    assert cli_main(["finetune", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stim-hf: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--epochs", "0"], "--epochs 0 must be an integer >= 1"),
        (["--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
        ([], "stim-hf finetune needs --epochs N"),
        (["--epochs", "1", "--learning_rate", "-1"], "learning_rate=-1.0 is out of range"),
        (["--epochs", "1", "--ce-weight", "-1"], "--ce-weight -1.0 is out of range"),
        (["--epochs", "1", "--batch-size", "0"], "--batch-size 0 must be an integer >= 1"),
        (["--epochs", "1", "--optim_args", "momentum"], "optim_args='momentum' must be comma-separated key=value"),
        (["--epochs", "1", "--nonsense", "3"], "unknown command-line argument(s) ['--nonsense']"),
    ],
)
def test_bad_settings_are_refused_in_one_line(export, capsys, no_training, extra, expected):
    assert expected in _refused(capsys, [str(export), "--config", QUICKSTART, *extra])


def test_no_training_data_is_refused(export, capsys, no_training):
    err = _refused(capsys, [str(export), "--epochs", "1"])
    assert "stim-hf finetune needs training images: give --config RECIPE.yaml" in err


def test_a_folder_that_is_no_export_is_refused(run, tmp_path, capsys, no_training):
    assert "is not a stim-hf export (it has no export_info.json" in _refused(
        capsys, [str(run), "--epochs", "1", "--config", QUICKSTART]
    )
    assert "does not exist" in _refused(capsys, [str(tmp_path / "nope"), "--epochs", "1", "--config", QUICKSTART])


def test_a_teacher_that_is_gone_is_refused_with_the_fix(export, tmp_path, capsys, no_training):
    folder = copy_of(export, tmp_path)
    info = json.loads((folder / "export_info.json").read_text())
    info["source"] = str(tmp_path / "moved_away")
    (folder / "export_info.json").write_text(json.dumps(info))
    write_folder_manifest(folder)  # edited on purpose
    kept = digests(folder)
    err = _refused(capsys, [str(folder), "--epochs", "1", "--config", QUICKSTART])
    assert f"'{tmp_path / 'moved_away'}'" in err and "give it with --teacher PATH" in err
    assert digests(folder) == kept and sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_a_teacher_that_does_not_fit_is_refused(export, tmp_path, capsys, no_training):
    folder = copy_of(export, tmp_path)
    err = _refused(capsys, [str(folder), "--epochs", "1", "--config", QUICKSTART, "--teacher", str(export)])
    assert "is not the full network this export came from: its stages hold [1, 2, 2] blocks" in err


def test_an_output_that_exists_needs_overwrite(export, run, tmp_path, capsys, no_training):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    err = _refused(capsys, [str(export), "--epochs", "1", "--config", QUICKSTART, "--output", str(tmp_path / "taken")])
    assert "already exists and is not empty" in err


def test_data_with_another_number_of_classes_is_refused_before_training(export, tmp_path, capsys, no_training):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 16), (40 * i, 100 if label == "a" else 200, 0)).save(
                tmp_path / "images" / label / f"{i}.png"
            )
    folder = copy_of(export, tmp_path)
    assert (
        cli_main(
            ["finetune", str(folder), "--epochs", "1", "--train_dir", str(tmp_path / "images"), "--image_size", "16"]
        )
        == 2
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        "stim-hf: error: the training data have 2 classes and the export 10; give the data the model was trained on "
        "(--config RECIPE.yaml)"
    )

"""Content hashes: every folder stim_hf writes is sealed with its files' hashes, and every reader checks them first.

A "damaged" file here has one byte changed and its size and modification time kept, as bit rot or a
faulty copy leaves it: only the hash can tell."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import xxhash
from conftest import make_tensor_dataset
from transformers import TrainerCallback

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments, cli
from stim_hf.cli.dispatch import run_guarded
from stim_hf.cli.train import check_model_source
from stim_hf.errors import ConfigError
from stim_hf.tools.export import export_subnet
from stim_hf.training import integrity
from stim_hf.training.checkpointing import (
    MANIFEST_NAME,
    checkpoint_problems,
    resolve_resume_checkpoint,
)
from stim_hf.training.config import ModelArguments
from stim_hf.training.integrity import FOLDER_MANIFEST_NAME, folder_problems, write_folder_manifest
from stim_hf.training.modeling import check_saved_model_dir, load_saved_classifier

make_dataset = functools.partial(make_tensor_dataset, n=48)
CHECKPOINT_FILES = [
    "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
    "training_args.json", "config.json", "modeling_cifar_resnet.py",
]  # fmt: skip
"""One of each kind of file a checkpoint holds: weights, torch archives, the Trainer's and our JSON, model code."""
TRAINING_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
DIGITS = ["--dataset_name", "sklearn:digits", "--image_size", "16"]


def make_args(output_dir: Path, **kwargs) -> StimulativeTrainingArguments:
    defaults = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, learning_rate=0.05, optim="sgd",
        optim_args="momentum=0.9", max_steps=4, save_strategy="steps", save_steps=2, logging_steps=1,
        report_to="none", seed=7, use_cpu=True, disable_tqdm=True, stim_method="stpp",
    )  # fmt: skip
    return StimulativeTrainingArguments(**(defaults | kwargs))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 4 steps: checkpoint-2, checkpoint-4 and the final model in its output_dir."""
    import torch

    from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification

    torch.manual_seed(0)
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=14, widths=[8, 16, 32], num_labels=10))
    run = tmp_path_factory.mktemp("hashes") / "run"
    trainer = StimulativeTrainer(model=model, args=make_args(run), train_dataset=make_dataset())
    trainer.train()
    trainer.save_model()
    return run


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run, to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def damage(path: Path) -> None:
    """Change one byte in the middle of ``path``, keeping its size and its modification time (as bit rot does)."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("stim-hf: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------------------------------
# Written
# --------------------------------------------------------------------------------------------------


def test_every_folder_stim_hf_writes_is_sealed_with_each_files_hash(run, tmp_path):
    export = tmp_path / "export"
    export_subnet(run, [1, 1, 1], export)
    for folder, name in ((run / "checkpoint-4", MANIFEST_NAME), (run, FOLDER_MANIFEST_NAME), (export, None)):
        name = name or FOLDER_MANIFEST_NAME
        manifest = json.loads((folder / name).read_text())
        assert manifest["format"] == 2 and manifest["hash"] == "xxh3_128"
        assert set(manifest["hashes"]) == set(manifest["files"])
        for file, digest in manifest["hashes"].items():
            assert digest == xxhash.xxh3_128((folder / file).read_bytes()).hexdigest(), (folder, file)
    assert {"model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json"} <= set(
        json.loads((run / "checkpoint-4" / MANIFEST_NAME).read_text())["files"]
    )
    final = json.loads((run / FOLDER_MANIFEST_NAME).read_text())["files"]
    assert {"model.safetensors", "config.json", "training_args.json"} <= set(final)
    assert not any(name.startswith("checkpoint-") for name in final)  # the model's files, not the run's
    assert {"model.safetensors", "export_info.json", "README.md"} <= set(
        json.loads((export / FOLDER_MANIFEST_NAME).read_text())["files"]
    )


# --------------------------------------------------------------------------------------------------
# A damaged checkpoint and resume
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_same_size_change_in_any_file_of_a_checkpoint_is_found(run, name, caplog):
    checkpoint = run / "checkpoint-4"
    damage(checkpoint / name)
    problem = (
        f"{name} is damaged (the bytes differ from those written, at the same size: the xxh3_128 hash is not the one "
        f"in {MANIFEST_NAME})"
    )
    assert checkpoint_problems(str(checkpoint)) == [problem]
    assert checkpoint_problems(str(checkpoint), hashes=False) == []  # sizes alone cannot tell
    with caplog.at_level(logging.WARNING, logger="stim_hf"):
        assert resolve_resume_checkpoint(True, str(run)) == str(run / "checkpoint-2")
    assert f"skipping damaged checkpoint {checkpoint}: {problem}" in caplog.text
    with pytest.raises(ConfigError, match=rf"checkpoint-4' is damaged \({name} is damaged .*copy it again"):
        resolve_resume_checkpoint(str(checkpoint), str(run))
    if name in TRAINING_STATE:  # read by a resume only: a tool that loads the model does not read it
        check_saved_model_dir(checkpoint, "checkpoint")
    else:
        with pytest.raises(ConfigError, match=rf"is not as it was written: {name} is damaged"):
            check_saved_model_dir(checkpoint, "checkpoint")


def test_a_resume_skips_a_damaged_checkpoint_and_stops_in_one_line_when_none_is_left(
    run, tiny_cifar_resnet, caplog, capsys
):
    damage(run / "checkpoint-4" / "model.safetensors")
    resumed = StimulativeTrainer(
        model=tiny_cifar_resnet(), args=make_args(run, max_steps=6), train_dataset=make_dataset()
    )
    with caplog.at_level(logging.INFO, logger="stim_hf"):
        resumed.train(resume_from_checkpoint=True)
    assert f"skipping damaged checkpoint {run / 'checkpoint-4'}: model.safetensors is damaged" in caplog.text
    assert f"resuming from {run / 'checkpoint-2'}, the last complete checkpoint" in caplog.text
    assert resumed.state.global_step == 6

    for step in (2, 4, 6):
        damage(run / f"checkpoint-{step}" / "optimizer.pt")
    again = StimulativeTrainer(
        model=tiny_cifar_resnet(), args=make_args(run, max_steps=8), train_dataset=make_dataset()
    )
    assert run_guarded(lambda: again.train(resume_from_checkpoint=True)) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"stim-hf: error: resume_from_checkpoint=true but no checkpoint in '{run}' is complete")
    assert "checkpoint-6: optimizer.pt is damaged" in line and "checkpoint-2: optimizer.pt is damaged" in line


def test_the_best_checkpoint_is_checked_before_it_is_loaded(tmp_path, tiny_cifar_resnet):
    data = make_dataset()

    class DamageTheBest(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:
                damage(Path(state.best_model_checkpoint) / "model.safetensors")

    args = make_args(
        tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss"
    )
    trainer = StimulativeTrainer(
        model=tiny_cifar_resnet(), args=args, train_dataset=data, eval_dataset=data, callbacks=[DamageTheBest()]
    )
    with pytest.raises(ConfigError, match=r"the best checkpoint '.*' \(load_best_model_at_end\) is not as it was "):
        trainer.train()


# --------------------------------------------------------------------------------------------------
# Every reader
# --------------------------------------------------------------------------------------------------


def _export_of(run: Path, tmp_path: Path) -> Path:
    export = tmp_path / "export"
    export_subnet(run, [1, 1, 1], export)
    return export


READERS = ["export", "loafing", "search", "finetune (the export)", "finetune (its full network)", "train from it"]


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_refuses_a_damaged_model_in_one_line(run, tmp_path, reader, capsys):
    export = _export_of(run, tmp_path) if reader.startswith("finetune") else None
    damaged = export if reader == "finetune (the export)" else run
    damage(damaged / "model.safetensors")
    capsys.readouterr()
    out = tmp_path / "out"
    argv = {
        "export": ["export", str(run), "--depths", "1,1,1", "--output", str(out)],
        "loafing": ["loafing", str(run), *DIGITS, "--max_eval_samples", "32", "--num-subnets", "1",
                    "--recalibrate-bn", "0", "--output-dir", str(out), "--no-progress"],
        "search": ["search", str(run), *DIGITS, "--output-dir", str(out), "--holdout-samples", "32",
                   "--recalibrate-bn", "32", "--latency", "none", "--progress", "false"],
        "finetune (the export)": ["finetune", str(export), "--epochs", "1", *DIGITS],
        "finetune (its full network)": ["finetune", str(export), "--epochs", "1", *DIGITS],
    }.get(reader)  # fmt: skip
    if argv is None:  # stim-hf train's check of model_name_or_path, before any data is loaded
        assert run_guarded(lambda: check_model_source(ModelArguments(model_name_or_path=str(run)))) == 2
    else:
        assert cli.main(argv) == 2
    line = _error_line(capsys.readouterr().err)
    assert "model.safetensors is damaged (the bytes differ from those written, at the same size" in line, line
    assert f"'{damaged}'" in line and f"delete its {FOLDER_MANIFEST_NAME} to use them unchecked" in line
    assert not out.exists()


def test_a_damaged_record_of_an_export_is_named_before_it_is_read(run, tmp_path, capsys):
    export = _export_of(run, tmp_path)
    damage(export / "export_info.json")
    capsys.readouterr()
    assert cli.main(["finetune", str(export), "--epochs", "1", *DIGITS]) == 2
    assert "export_info.json is damaged" in _error_line(capsys.readouterr().err)


def test_a_search_export_is_sealed_with_the_search_record(run, tmp_path):
    out, export = tmp_path / "out", tmp_path / "pick"
    argv = ["search", str(run), *DIGITS, "--output-dir", str(out), "--export", str(export), "--budget", "flops=0.6",
            "--holdout-samples", "32", "--recalibrate-bn", "32", "--latency", "none",
            "--progress", "false"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "search" in json.loads((export / "export_info.json").read_text())
    assert folder_problems(export) == [] and not list(tmp_path.glob(".*"))
    load_saved_classifier(export)


# --------------------------------------------------------------------------------------------------
# Folders from before content hashes, and what is not checked
# --------------------------------------------------------------------------------------------------


def test_a_checkpoint_without_hashes_is_read_with_a_one_time_note(run, caplog):
    checkpoint = run / "checkpoint-4"
    manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
    del manifest["hash"], manifest["hashes"]
    (checkpoint / MANIFEST_NAME).write_text(json.dumps(manifest | {"format": 1}))
    with caplog.at_level(logging.WARNING, logger="stim_hf"):
        assert checkpoint_problems(str(checkpoint)) == []
        assert resolve_resume_checkpoint(True, str(run)) == str(checkpoint)
    note = f"note: '{checkpoint}' was written before stim_hf recorded content hashes (its {MANIFEST_NAME} lists sizes"
    assert caplog.text.count(note) == 1, caplog.text


def test_a_model_folder_without_a_manifest_still_loads(run, tmp_path, tiny_cifar_resnet, caplog):
    (run / FOLDER_MANIFEST_NAME).unlink()  # a run's folder written before content hashes
    plain = tmp_path / "plain"
    tiny_cifar_resnet().save_pretrained(plain)  # save_pretrained, a Hub download: no manifest, nothing stim_hf's
    with caplog.at_level(logging.WARNING, logger="stim_hf"):
        load_saved_classifier(run)
        load_saved_classifier(run)
        load_saved_classifier(plain)
    assert caplog.text.count(f"note: '{run}' was written before stim_hf recorded content hashes (it has no") == 1
    assert f"'{plain}'" not in caplog.text


def test_an_edited_model_card_is_no_damage_and_a_malformed_manifest_is_a_problem(run, tmp_path):
    export = _export_of(run, tmp_path)
    card = export / "README.md"
    card.write_text(card.read_text() + "\nEdited on the Hub.\n")  # another size even
    load_saved_classifier(export)
    manifest = json.loads((export / FOLDER_MANIFEST_NAME).read_text())
    (export / FOLDER_MANIFEST_NAME).write_text(json.dumps(manifest | {"hashes": ["not", "a", "map"]}))
    assert folder_problems(export) == [f"its {FOLDER_MANIFEST_NAME} has a malformed map of hashes"]
    (export / FOLDER_MANIFEST_NAME).write_text("{not json")
    assert folder_problems(export)[0].startswith(f"its {FOLDER_MANIFEST_NAME} is unreadable (JSONDecodeError")


def test_sha256_manifests_are_checked_too(run, monkeypatch):
    monkeypatch.setattr(integrity, "HASH_NAME", "sha256")
    write_folder_manifest(run)
    monkeypatch.undo()
    assert json.loads((run / FOLDER_MANIFEST_NAME).read_text())["hash"] == "sha256"
    assert folder_problems(run) == []
    damage(run / "config.json")
    assert folder_problems(run) == [
        f"config.json is damaged (the bytes differ from those written, at the same size: the sha256 hash is not the "
        f"one in {FOLDER_MANIFEST_NAME})"
    ]


def test_messages_name_files_never_their_contents(run):
    secret = "hunter2-do-not-print"
    args = json.loads((run / "training_args.json").read_text())
    (run / "training_args.json").write_text(json.dumps(args | {"hub_token": secret}))
    with pytest.raises(ConfigError) as raised:
        check_saved_model_dir(run, "model")
    assert "training_args.json has" in str(raised.value) and secret not in str(raised.value)

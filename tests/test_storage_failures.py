"""Writes that fail half-way (a full disk, a read-only or vanished folder): one line naming the OS's cause, the
folder and the last complete checkpoint; the partial staging folder removed; nothing complete lost.

The full disk is real: a small tmpfs (``small_disk``, tests/conftest.py), filled with a file of zeros."""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, fill_disk, make_tensor_dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments, cli
from stim_hf.cli.dispatch import run_guarded
from stim_hf.errors import StorageError
from stim_hf.tools.export import export_subnet
from stim_hf.training.checkpointing import (
    MANIFEST_NAME,
    checkpoint_problems,
    publish_checkpoint,
    remove_stale_staging,
)
from stim_hf.training.integrity import folder_problems
from stim_hf.training.write_failures import storage_error

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")
make_dataset = functools.partial(make_tensor_dataset, n=48)


def make_args(output_dir: Path, **kwargs) -> StimulativeTrainingArguments:
    defaults = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, learning_rate=0.05, optim="adamw_torch",
        max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1, logging_steps=1, report_to="none",
        seed=7, use_cpu=True, disable_tqdm=True, stim_method="stpp",
    )  # fmt: skip
    return StimulativeTrainingArguments(**(defaults | kwargs))


class _AfterStep(TrainerCallback):
    """Runs ``action`` once checkpoint ``step`` is written (and published)."""

    def __init__(self, step: int, action) -> None:
        self.step, self.action = step, action

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.action()


def _pages(size: int) -> int:
    return -(-size // 4096) * 4096


def _written_before(checkpoint: Path, name: str) -> int:
    """Bytes (in tmpfs pages) of the files a checkpoint writes before ``name``: model, config, code, arguments."""
    first = ("model.safetensors", "config.json", "configuration_cifar_resnet.py", "modeling_cifar_resnet.py")
    before = {"model.safetensors": (), "optimizer.pt": (*first, "training_args.json")}[name]
    return sum(_pages((checkpoint / file).stat().st_size) for file in before)


# --------------------------------------------------------------------------------------------------
# Checkpoints on a full disk
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failing", ["model.safetensors", "optimizer.pt"], ids=["weights (safetensors)", "optimizer (torch.save)"]
)
def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_loses_nothing(
    small_disk, tmp_path, tiny_cifar_resnet, failing
):
    """save_total_limit 1: checkpoint-2 must survive the failed checkpoint-4, and a resume from it be exact."""
    disk = small_disk("8m")
    run = disk / "run"

    def fill() -> None:
        fill_disk(disk, leave=_written_before(run / "checkpoint-2", failing))

    trainer = StimulativeTrainer(
        model=tiny_cifar_resnet(), args=make_args(run), train_dataset=make_dataset(), callbacks=[_AfterStep(2, fill)]
    )
    with pytest.raises(StorageError) as raised:
        trainer.train()
    message = str(raised.value)
    assert message.startswith(f"could not write checkpoint-4 to '{run}': No space left on device (ENOSPC, "), message
    assert f"the partial folder '{run / '.staging-checkpoint-4'}' was removed" in message
    assert (
        f"the last complete checkpoint, which a resume (resume_from_checkpoint: true) would use, is '{run}" in message
    )
    assert message.endswith("free space on that filesystem, or set output_dir to a folder on one with room")
    assert "\n" not in message and raised.value.errno == errno.ENOSPC
    if failing == "optimizer.pt":  # torch says nothing of the cause: the folder was asked
        assert "unexpected pos" in str(raised.value.__cause__) or "write" in str(raised.value.__cause__)
        assert not isinstance(raised.value.__cause__, OSError)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".", "checkpoint"))) == ["checkpoint-2"]
    assert checkpoint_problems(str(run / "checkpoint-2")) == []  # as written, hashes and all

    # Space again: the resume from checkpoint-2 ends where an uninterrupted run does.
    del raised
    (disk / "filler").unlink()
    resumed = StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(run), train_dataset=make_dataset())
    resumed.train(resume_from_checkpoint=True)
    reference = StimulativeTrainer(
        model=tiny_cifar_resnet(), args=make_args(tmp_path / "reference"), train_dataset=make_dataset()
    )
    reference.train()
    expected = load_file(tmp_path / "reference" / "checkpoint-4" / "model.safetensors")
    actual = load_file(run / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_a_full_disk_through_the_command_line_is_one_error_line(small_disk, monkeypatch, capsys):
    """The quickstart recipe (save_total_limit 1) on a disk with room for one checkpoint and a half."""
    disk = small_disk("3500k")
    run = disk / "run"
    monkeypatch.chdir(disk.parent)
    argv = [
        "train", QUICKSTART, "--output_dir", str(run), "--max_steps", "12", "--save_steps", "4", "--save_strategy",
        "steps", "--eval_strategy", "no", "--num_eval_subnets", "0", "--report_to", "none", "--disable_tqdm", "true",
        "--dataloader_num_workers", "0",
    ]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("stim-hf: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"stim-hf: error: could not write checkpoint-8 to '{run}': No space left on device")
    assert f"is '{run / 'checkpoint-4'}'" in lines[0]
    assert not list(run.glob(".staging-*")) and checkpoint_problems(str(run / "checkpoint-4")) == []


def test_a_read_only_filesystem_is_named(small_disk, tiny_cifar_resnet):
    disk = small_disk("8m")
    run = disk / "run"

    def read_only() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)

    trainer = StimulativeTrainer(
        model=tiny_cifar_resnet(),
        args=make_args(run),
        train_dataset=make_dataset(),
        callbacks=[_AfterStep(2, read_only)],
    )
    with pytest.raises(StorageError) as raised:
        trainer.train()
    message = str(raised.value)
    assert message.startswith(f"could not write checkpoint-4 to '{run}': Read-only file system (EROFS)"), message
    assert f"would use, is '{run / 'checkpoint-2'}'" in message
    assert message.endswith("that filesystem is mounted read-only: set output_dir to a folder on a writable one")
    assert checkpoint_problems(str(run / "checkpoint-2")) == []


def test_a_folder_that_vanishes_while_written_is_named(tmp_path, tiny_cifar_resnet):
    """Something else deletes the staging folder mid-write: torch fails without an errno, the folder is missing."""
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_dataset())
    original = trainer._save_optimizer_and_scheduler

    def vanish_then_save(output_dir):
        if trainer.state.global_step == 4:
            shutil.rmtree(tmp_path / ".staging-checkpoint-4")
        original(output_dir)

    trainer._save_optimizer_and_scheduler = vanish_then_save
    with pytest.raises(StorageError) as raised:
        trainer.train()
    message = str(raised.value)
    staging = tmp_path / ".staging-checkpoint-4"
    assert message.startswith(
        f"could not write checkpoint-4 to '{tmp_path}': No such file or directory (ENOENT, '{staging}' vanished while "
        "it was being written)"
    ), message
    assert f"is '{tmp_path / 'checkpoint-2'}'" in message and "a clean-up job" in message


def test_an_error_that_is_no_write_failure_goes_on_unchanged(tmp_path, tiny_cifar_resnet):
    """A bug inside a save (here a RuntimeError with space to spare) is not dressed up as a storage problem."""
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_dataset())

    def broken(output_dir):
        raise RuntimeError("a bug")

    trainer._save_rng_state = broken
    with pytest.raises(RuntimeError, match="a bug"):
        trainer.train()


# --------------------------------------------------------------------------------------------------
# The final model, an export, a stray write
# --------------------------------------------------------------------------------------------------


def test_the_final_save_on_a_full_disk_keeps_the_previous_model(small_disk, tiny_cifar_resnet):
    disk = small_disk("4m")
    run = disk / "run"
    trainer = StimulativeTrainer(
        model=tiny_cifar_resnet(), args=make_args(run, save_strategy="no"), train_dataset=make_dataset()
    )
    trainer.save_model()
    before = (run / "model.safetensors").read_bytes()
    trainer.train()
    fill_disk(disk)
    with pytest.raises(StorageError) as raised:
        trainer.save_model()
    message = str(raised.value)
    assert message.startswith(f"could not write the model to '{run}': No space left on device (ENOSPC"), message
    assert f"'{run}' keeps the files of its previous save, if any; '{run}' holds no complete checkpoint" in message
    assert (run / "model.safetensors").read_bytes() == before and folder_problems(run) == []
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_an_export_to_a_full_disk_writes_nothing(small_disk, tmp_path, tiny_cifar_resnet, capsys):
    source = tmp_path / "source"
    tiny_cifar_resnet().save_pretrained(source)
    capsys.readouterr()
    disk = small_disk("1m")
    fill_disk(disk)
    output = disk / "export"
    assert cli.main(["export", str(source), "--depths", "1,1,1", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"stim-hf: error: could not write the export to '{output}': No space left on device")
    assert err.count("\n") == 1 and f"nothing was written to '{output}'" in err, err
    assert "set --output to a folder on one with room" in err
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no export, no staging folder

    # With room, the same command writes it, sealed with its hashes.
    (disk / "filler").unlink()
    export_subnet(source, [1, 1, 1], output)
    assert folder_problems(output) == [] and (output / "stim_hf_manifest.json").is_file()


def test_a_stray_write_on_a_full_disk_is_one_line(small_disk, capsys):
    """Outside the guarded writes (the run's records, a report): still one line naming the OS's cause."""
    disk = small_disk("1m")
    fill_disk(disk)

    def write_records():
        with open(disk / "all_results.json", "w") as handle:
            json.dump({"accuracy": 0.5, "padding": "x" * 100_000}, handle)

    assert run_guarded(write_records) == 2
    err = capsys.readouterr().err
    assert err == (
        f"stim-hf: error: could not write '{disk / 'all_results.json'}': No space left on device (ENOSPC); free space "
        "on that filesystem, or set the output to a folder on one with room\n"
    )


@pytest.mark.parametrize(
    ("code", "remedy"),
    [
        (errno.EACCES, "make '{folder}' writable for this user, or set output_dir to another folder"),
        (errno.EDQUOT, "free some of your quota there (or ask for more), or set output_dir to a folder elsewhere"),
        (errno.EIO, "the storage reported an I/O error: check the disk or the network filesystem, then run again"),
    ],
    ids=["permission", "quota", "I/O error"],
)
def test_each_cause_gets_its_remedy(tmp_path, code, remedy):
    """Causes a root test run cannot provoke for real (root ignores permissions and quotas), as the OS reports them."""
    partial = tmp_path / ".staging-checkpoint-4"
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"half")
    error = OSError(code, os.strerror(code), str(partial / "optimizer.pt"))
    failure = storage_error(error, "checkpoint-4", str(tmp_path), partial=[str(partial)], intact=lambda: "kept")
    assert str(failure) == (
        f"could not write checkpoint-4 to '{tmp_path}': {os.strerror(code)} ({errno.errorcode[code]}); the partial "
        f"folder '{partial}' was removed; kept; " + remedy.format(folder=tmp_path)
    )
    assert failure.errno == code and not partial.exists()
    assert storage_error(ValueError("not a write"), "checkpoint-4", str(tmp_path)) is None


# --------------------------------------------------------------------------------------------------
# Nothing complete lost: publishing and rotation
# --------------------------------------------------------------------------------------------------


def _trained_run(folder: Path, tiny_cifar_resnet) -> Path:
    args = make_args(folder, save_total_limit=None, optim="sgd")
    StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=make_dataset()).train()
    return folder


def test_a_failed_publish_puts_the_older_checkpoint_back(tmp_path, tiny_cifar_resnet, monkeypatch):
    """A run resumed from step 2 writes checkpoint-4 again: if the rename of the new one fails, the old one returns."""
    run = _trained_run(tmp_path / "run", tiny_cifar_resnet)
    staged = tmp_path / "run" / ".staging-checkpoint-4" / "checkpoint-4"
    shutil.copytree(run / "checkpoint-4", staged)
    real_replace = os.replace

    def failing_replace(source, target):
        if Path(source) == staged:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="Read-only"):
        publish_checkpoint(str(staged), str(run / "checkpoint-4"))
    monkeypatch.undo()
    assert checkpoint_problems(str(run / "checkpoint-4")) == [] and not list(run.glob(".replaced-*"))


def test_a_checkpoint_left_aside_by_a_kill_is_restored_not_deleted(tmp_path, tiny_cifar_resnet):
    """Killed between the two renames of a publish: the only copy of checkpoint-4 is '.replaced-checkpoint-4'."""
    run = _trained_run(tmp_path / "run", tiny_cifar_resnet)
    os.replace(run / "checkpoint-4", run / ".replaced-checkpoint-4")
    # A rotation killed mid-deletion: a partial folder, to go.
    shutil.copytree(run / "checkpoint-2", run / ".replaced-checkpoint-6")
    (run / ".replaced-checkpoint-6" / "optimizer.pt").unlink()
    remove_stale_staging(str(run))
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-4"]
    assert checkpoint_problems(str(run / "checkpoint-4")) == []
    assert json.loads((run / "checkpoint-4" / MANIFEST_NAME).read_text())["global_step"] == 4

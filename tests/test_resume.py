"""Exact resume after a crash, atomic checkpoints, and choosing the checkpoint to resume from."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tensor_dataset
from safetensors.torch import load_file

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments, cli
from stim_hf.cli.train import main as train_main
from stim_hf.errors import ConfigError
from stim_hf.training.checkpointing import (
    MANIFEST_NAME,
    SeededBatchDataset,
    checkpoint_problems,
    find_last_complete_checkpoint,
    resolve_resume_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")
# The quickstart recipe, reduced: 12 steps (about half an epoch), a checkpoint every 4.
REDUCED = [
    "--max_steps", "12", "--save_steps", "4", "--save_strategy", "steps", "--eval_strategy", "no",
    "--num_eval_subnets", "0", "--report_to", "none", "--dataloader_num_workers", "0",
    "--logging_steps", "1", "--disable_tqdm", "true",
]  # fmt: skip
# Logged per step: equal values after the resume mean the same sub-networks, input sizes and batches.
STEP_KEYS = ("loss", "ce_loss", "kl_loss", "subnet_depth_fraction", "subnet_input_size", "grad_norm")


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        # The thread count of this process (1 unless OMP_NUM_THREADS says otherwise, tests/conftest.py), which runs
        # the reference and the resumed run: the same floating-point path in every run of the test.
        OMP_NUM_THREADS=str(torch.get_num_threads()),
        PYTHONUNBUFFERED="1",
    )


def _kill_after(process: subprocess.Popen, checkpoint: Path, timeout: float = 240) -> None:
    """SIGKILL ``process`` as soon as ``checkpoint`` appears (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if checkpoint.is_dir():
            process.send_signal(signal.SIGKILL)
            return
        time.sleep(0.01)


def _step_logs(output_dir: Path) -> dict[int, dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry for entry in state["log_history"] if "ce_loss" in entry}


@pytest.mark.parametrize(
    ("pipeline", "augmentation"), [("pil", "cifar"), ("predecoded", "cifar"), ("device_color", "imagenet")]
)
def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path, caplog, monkeypatch, pipeline, augmentation):
    """A run killed with SIGKILL after a checkpoint and resumed ends with the uninterrupted run's weights."""
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reduced = [*REDUCED, "--image_pipeline", pipeline, "--augmentation", augmentation]
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "victim.log", "w") as log:
        victim = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), QUICKSTART, *reduced, "--output_dir", str(run_dir)],
            env=_env(), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    watcher = threading.Thread(target=_kill_after, args=(victim, run_dir / "checkpoint-4"), daemon=True)
    watcher.start()
    try:
        # Meanwhile, the uninterrupted reference run, in this process (as many threads as the others).
        train_main([QUICKSTART, *reduced, "--output_dir", str(reference_dir)])
        watcher.join(timeout=240)
        status = victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert status == -signal.SIGKILL, (tmp_path / "victim.log").read_text()[-3000:]
    assert not (run_dir / "model.safetensors").exists(), "the run finished before it could be killed"
    assert "\r" not in (tmp_path / "victim.log").read_text()  # datasets' loading and decoding as whole lines in a log
    complete = [p.name for p in run_dir.glob("checkpoint-*") if not checkpoint_problems(str(p))]
    assert complete, "the kill left no complete checkpoint"

    # A crash while copying or writing a checkpoint: a newer checkpoint-12 without weights.
    half_written = run_dir / "checkpoint-12"
    shutil.copytree(run_dir / complete[0], half_written)
    (half_written / "model.safetensors").unlink()
    (half_written / MANIFEST_NAME).unlink()

    # `stim-hf train`, in this process (saves a third interpreter start-up; as many threads as the others).
    with caplog.at_level(logging.INFO, logger="stim_hf"):
        status = cli.main(
            ["train", QUICKSTART, *reduced, "--output_dir", str(run_dir), "--resume_from_checkpoint", "true"]
        )
    output = caplog.text
    assert status == 0, output[-3000:]
    assert f"skipping incomplete checkpoint {half_written}: model weights (model.safetensors) are missing" in output
    resumed_from = int(output.split("resuming from ")[1].split(",")[0].rsplit("-", 1)[1])
    assert resumed_from in (4, 8)

    expected, actual = load_file(reference_dir / "model.safetensors"), load_file(run_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    reference_logs, resumed_logs = _step_logs(reference_dir), _step_logs(run_dir)
    for step in range(resumed_from + 1, 13):
        for key in STEP_KEYS:
            assert resumed_logs[step][key] == reference_logs[step][key], (step, key)
    # The resumed run replaced the half-written checkpoint-12 and rotated down to save_total_limit (1).
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-12"]
    assert checkpoint_problems(str(run_dir / "checkpoint-12")) == []
    assert not list(run_dir.glob(".staging-*")) and not list(run_dir.rglob("training_args.bin"))


# -- in-process tests on a tiny model -------------------------------------------------------------------


make_dataset = functools.partial(make_tensor_dataset, n=48)


def make_args(output_dir: Path, **kwargs) -> StimulativeTrainingArguments:
    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=0.05,
        optim="sgd",
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to="none",
        seed=7,
        use_cpu=True,
        disable_tqdm=True,
        stim_method="stpp",
    )
    return StimulativeTrainingArguments(**(defaults | kwargs))


def test_checkpoints_are_complete_and_pickle_free(tmp_path, tiny_cifar_resnet):
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_dataset())
    trainer.train()
    trainer.save_model()
    for name in ("checkpoint-2", "checkpoint-4"):
        checkpoint = tmp_path / name
        assert checkpoint_problems(str(checkpoint)) == []
        manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
        assert manifest["global_step"] == int(name.split("-")[1])
        assert {"model.safetensors", "optimizer.pt", "rng_state.pth", "training_args.json"} <= set(manifest["files"])
        assert json.loads((checkpoint / "training_args.json").read_text())["stim_method"] == "stpp"
    assert not list(tmp_path.rglob("training_args.bin"))
    assert (tmp_path / "training_args.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_crash_while_writing_a_checkpoint_never_publishes_it(tmp_path, tiny_cifar_resnet):
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_dataset())
    original = trainer._save_rng_state

    def crash_at_step_4(output_dir):
        if trainer.state.global_step == 4:
            raise KeyboardInterrupt("killed while writing checkpoint-4")
        original(output_dir)

    trainer._save_rng_state = crash_at_step_4
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not (tmp_path / "checkpoint-4").exists()
    assert (tmp_path / ".staging-checkpoint-4" / "checkpoint-4" / "model.safetensors").is_file()
    assert resolve_resume_checkpoint(True, str(tmp_path)) == str(tmp_path / "checkpoint-2")

    resumed = StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_dataset())
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    assert checkpoint_problems(str(tmp_path / "checkpoint-4")) == []
    assert not (tmp_path / ".staging-checkpoint-4").exists()


def test_last_complete_checkpoint_skips_broken_ones(tmp_path, tiny_cifar_resnet):
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_dataset())
    trainer.train()
    good = tmp_path / "checkpoint-4"
    # Written by another tool (no manifest), optimizer state truncated by a crash.
    truncated = tmp_path / "checkpoint-6"
    shutil.copytree(good, truncated)
    (truncated / MANIFEST_NAME).unlink()
    data = (truncated / "optimizer.pt").read_bytes()
    (truncated / "optimizer.pt").write_bytes(data[: len(data) // 2])
    # A manifest that lists a file that never arrived.
    missing = tmp_path / "checkpoint-8"
    shutil.copytree(good, missing)
    _set_manifest(missing, global_step=8)
    (missing / "scheduler.pt").unlink()
    # Not a checkpoint at all.
    (tmp_path / "checkpoint-10").write_text("a file")

    last, skipped = find_last_complete_checkpoint(str(tmp_path))
    assert last == str(good)
    reasons = {Path(path).name: problems for path, problems in skipped}
    assert reasons["checkpoint-8"] == ["scheduler.pt is missing"]
    assert reasons["checkpoint-6"][0].startswith("optimizer.pt is truncated or not a torch archive")
    with pytest.raises(ConfigError, match=r"checkpoint-8' is incomplete \(scheduler.pt is missing\)"):
        resolve_resume_checkpoint(str(missing), str(tmp_path))
    with pytest.raises(ConfigError, match="is not a directory"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-10"), str(tmp_path))
    assert resolve_resume_checkpoint("false", str(tmp_path)) is None


def _set_manifest(checkpoint: Path, **values) -> None:
    manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
    (checkpoint / MANIFEST_NAME).write_text(json.dumps(manifest | values))


def test_malformed_manifests_are_problems_not_crashes(tmp_path, tiny_cifar_resnet):
    StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_dataset()).train()
    cases = {
        6: ({"global_step": 6, "files": None}, "does not list the checkpoint's files"),
        8: ({"global_step": 8, "files": ["model.safetensors"]}, "does not list the checkpoint's files"),
        10: ({"global_step": 10, "files": {}}, "does not list trainer_state.json"),
        12: ({}, "is of step 4, not 12"),  # copied from checkpoint-4, manifest and all
    }
    for step, (values, message) in cases.items():
        copy = tmp_path / f"checkpoint-{step}"
        shutil.copytree(tmp_path / "checkpoint-4", copy)
        _set_manifest(copy, **values)
        assert any(message in problem for problem in checkpoint_problems(str(copy))), step
    assert resolve_resume_checkpoint(True, str(tmp_path)) == str(tmp_path / "checkpoint-4")


def test_a_checkpoint_without_the_state_of_an_exact_resume_is_refused(tmp_path, tiny_cifar_resnet):
    """Without a manifest, optimizer, scheduler and random states must be there: else the Trainer resumes inexactly."""
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_dataset())
    trainer.train()
    trainer.save_model()
    copy = tmp_path / "checkpoint-6"
    shutil.copytree(tmp_path / "checkpoint-4", copy)
    (copy / MANIFEST_NAME).unlink()
    assert checkpoint_problems(str(copy)) == []
    (copy / "optimizer.pt").unlink()
    (copy / "rng_state.pth").unlink()
    assert checkpoint_problems(str(copy)) == [
        "optimizer.pt is missing, so training cannot continue exactly from it",
        "rng_state.pth is missing, so training cannot continue exactly from it",
    ]
    assert resolve_resume_checkpoint(True, str(tmp_path)) == str(tmp_path / "checkpoint-4")
    # The run's final folder holds the model, not a checkpoint.
    with pytest.raises(
        ConfigError,
        match=r"is a run's folder, not a checkpoint \(.*optimizer.pt is missing.*last complete one is '.*checkpoint-4'",
    ):
        resolve_resume_checkpoint(str(tmp_path), str(tmp_path))
    # Pickled weights are never loaded.
    pickled = tmp_path / "checkpoint-8"
    shutil.copytree(tmp_path / "checkpoint-4", pickled)
    (pickled / MANIFEST_NAME).unlink()
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    assert "its weights are pickled (pytorch_model.bin), which stim_hf never loads" in checkpoint_problems(str(pickled))


def test_rotation_deletes_another_history_and_incomplete_checkpoints_first(tmp_path, tiny_cifar_resnet):
    """After a resume from checkpoint-4, the abandoned run's checkpoint-12 goes before the older, complete ones."""
    from stim_hf.training.checkpointing import rotate_checkpoints

    StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_dataset()).train()
    for step, broken in ((12, False), (5, True), (6, False)):  # written in this order: 6 is the newest
        copy = tmp_path / f"checkpoint-{step}"
        shutil.copytree(tmp_path / "checkpoint-4", copy)
        _set_manifest(copy, global_step=step)
        if broken:
            (copy / "optimizer.pt").unlink()
        time.sleep(0.01)
    removed = rotate_checkpoints(str(tmp_path), 3, keep=[str(tmp_path / "checkpoint-6")], current_step=6)
    assert [Path(path).name for path in removed] == ["checkpoint-12", "checkpoint-5"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("checkpoint", ".replaced"))) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]


def test_resume_into_another_model_is_refused_before_loading(tmp_path, tiny_cifar_resnet):
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_dataset())
    trainer.train()
    other = StimulativeTrainer(
        model=tiny_cifar_resnet(widths=(8, 16, 24)), args=make_args(tmp_path), train_dataset=make_dataset()
    )
    with pytest.raises(ConfigError, match=r"does not fit the model \(classifier.weight \(10, 32\) vs model \(10, 24\)"):
        other.train(resume_from_checkpoint=True)


def test_resume_into_a_deeper_or_shallower_model_is_refused_before_loading(tmp_path, tiny_cifar_resnet):
    StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_dataset()).train()
    for depth, message in ((20, r"6 model tensors not in the checkpoint"), (8, r"checkpoint tensors not in the model")):
        other = StimulativeTrainer(
            model=tiny_cifar_resnet(depth=depth),
            args=make_args(tmp_path, stim_method="ct"),
            train_dataset=make_dataset(),
        )
        with pytest.raises(ConfigError, match=rf"does not fit the model \(.*{message}"):
            other.train(resume_from_checkpoint=True)


def test_resume_with_another_optimizer_is_refused_and_other_changes_are_named(tmp_path, tiny_cifar_resnet, caplog):
    """AdamW would take SGD's parameter groups and fail at its first step (KeyError 'betas'): refused before.

    Other settings that break an exact continuation (here the seed) are named in a warning.
    """
    StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_dataset()).train()
    args = make_args(tmp_path, optim="adamw_torch", max_steps=6)
    resumed = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=make_dataset())
    with pytest.raises(ConfigError, match=r"holds the state of optim='sgd', and this run has optim='adamw_torch'"):
        resumed.train(resume_from_checkpoint=True)
    args = make_args(tmp_path, seed=8, max_steps=6)
    resumed = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=make_dataset())
    with caplog.at_level(logging.WARNING, logger="stim_hf.training.reliable_trainer"):
        resumed.train(resume_from_checkpoint=True)
    assert "with settings it was not trained with (seed 7 -> 8)" in caplog.text
    assert resumed.state.global_step == 6


def test_a_pickle_in_a_checkpoints_state_file_is_never_run(tmp_path, tiny_cifar_resnet):
    """A crafted optimizer.pt (code in its pickle) is refused by torch's weights_only load, as a ConfigError."""
    import pickle

    StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_dataset()).train()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    checkpoint = tmp_path / "checkpoint-4"
    torch.save({"state": Payload()}, checkpoint / "optimizer.pt", pickle_module=pickle)
    from stim_hf.training.checkpointing import write_manifest

    write_manifest(str(checkpoint), 4)
    resumed = StimulativeTrainer(
        model=tiny_cifar_resnet(), args=make_args(tmp_path, max_steps=6), train_dataset=make_dataset()
    )
    with pytest.raises(ConfigError, match="holds objects other than tensors and plain data, which are never unpickled"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()


def test_a_finished_run_is_not_trained_past_max_steps(tmp_path, tiny_cifar_resnet):
    """The Trainer would train one step more (checkpoint-5 after max_steps 4)."""
    StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_dataset()).train()
    again = StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_dataset())
    with pytest.raises(ConfigError, match=r"is at step 4 and max_steps is 4: that run is finished; raise max_steps"):
        again.train(resume_from_checkpoint=True)
    assert not (tmp_path / "checkpoint-5").exists()


def test_a_folder_that_is_no_checkpoint_is_named_so(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "recipe.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="is not a checkpoint folder .*give a checkpoint-\\* folder"):
        resolve_resume_checkpoint(str(tmp_path / "configs"), str(tmp_path))


def test_a_crash_while_saving_the_final_model_leaves_the_previous_one(tmp_path, tiny_cifar_resnet):
    trainer = StimulativeTrainer(
        model=tiny_cifar_resnet(), args=make_args(tmp_path, save_strategy="no"), train_dataset=make_dataset()
    )
    trainer.save_model()
    before = (tmp_path / "model.safetensors").read_bytes()
    trainer.train()
    model = trainer.model
    original = type(model).save_pretrained

    def crash_halfway(self, save_directory, **kwargs):
        original(self, save_directory, **kwargs)
        weights = Path(save_directory) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        raise KeyboardInterrupt("killed while saving")

    type(model).save_pretrained = crash_halfway
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.save_model()
    finally:
        type(model).save_pretrained = original
    assert (tmp_path / "model.safetensors").read_bytes() == before
    trainer.save_model()
    assert (tmp_path / "model.safetensors").read_bytes() != before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_best_checkpoint_points_to_the_published_folder(tmp_path, tiny_cifar_resnet):
    data = make_dataset()
    args = make_args(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        save_total_limit=1,
    )
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert Path(best).parent == tmp_path and Path(best).is_dir()
    stored = json.loads((Path(best) / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert Path(stored).parent == tmp_path


def test_seeded_batch_dataset_replays_augmentation():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, index):
            return torch.rand(2) + index

    dataset = SeededBatchDataset(Noisy(), seed=3)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    first = dataset.__getitems__([1, 4, 7])
    assert torch.equal(torch.random.get_rng_state(), before)  # the global stream is untouched
    torch.manual_seed(123)  # whatever the global state, the batch is the same
    again = dataset.__getitems__([1, 4, 7])
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = dataset.__getitems__([4, 1, 7])
    assert not torch.equal(first[1], other[0])
    assert not torch.equal(SeededBatchDataset(Noisy(), seed=4).__getitems__([1, 4, 7])[0], first[0])
    assert len(dataset) == 10 and dataset[2].shape == (2,)


@pytest.mark.parametrize("saved_fused, resumed_fused", [(False, True), (True, False)])
def test_resume_keeps_the_optimizer_kernels_this_run_chose(tmp_path, tiny_cifar_resnet, saved_fused, resumed_fused):
    """A checkpoint's fused/foreach choice is not restored over this run's fused_optimizer (state is)."""
    first = StimulativeTrainer(
        model=tiny_cifar_resnet(),
        args=make_args(tmp_path, fused_optimizer=saved_fused, optim_args="momentum=0.9"),
        train_dataset=make_dataset(),
    )
    first.train()
    saved = torch.load(tmp_path / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert bool(saved["param_groups"][0]["fused"]) is saved_fused
    resumed = StimulativeTrainer(
        model=tiny_cifar_resnet(),
        args=make_args(tmp_path, fused_optimizer=resumed_fused, optim_args="momentum=0.9", max_steps=6),
        train_dataset=make_dataset(),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert resumed.state.global_step == 6
    optimizer = resumed.optimizer.optimizer
    assert [bool(g["fused"]) for g in optimizer.param_groups] == [resumed_fused] * len(optimizer.param_groups)
    assert optimizer.state  # the momentum buffers came back

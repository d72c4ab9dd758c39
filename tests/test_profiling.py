"""profile_steps: a window of real training steps recorded with torch.profiler, trace and summary written."""

import json

import pytest
from conftest import REPO_ROOT, make_tensor_dataset

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments
from stim_hf.cli.train import parse_train_args
from stim_hf.errors import ConfigError
from stim_hf.training.profiling import parse_profile_steps


def make_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=5, optim="sgd", report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, stim_method="stpp", num_subnets=2, logging_steps=1,
        num_eval_subnets=0, seed=3,
    )  # fmt: skip
    return StimulativeTrainingArguments(**(defaults | kwargs))


def trace_names(path) -> list[str]:
    return [event.get("name", "") for event in json.loads(path.read_text())["traceEvents"]]


def test_a_window_of_steps_is_recorded_with_stim_hfs_phases(tmp_path, tiny_cifar_resnet):
    trainer = StimulativeTrainer(
        model=tiny_cifar_resnet(), args=make_args(tmp_path, profile_steps="2-3"), train_dataset=make_tensor_dataset(48)
    )
    trainer.train()
    assert trainer.profiling is False
    directory = tmp_path / "profile"
    assert sorted(p.name for p in directory.iterdir()) == ["rank0_steps2-3.pt.trace.json", "rank0_steps2-3.txt"]
    names = trace_names(directory / "rank0_steps2-3.pt.trace.json")
    # Two steps recorded, each with its batch wait, one micro-batch, one full and K = 2 sub-network forwards.
    assert names.count("stim_hf/wait_for_batches") == 2
    assert names.count("stim_hf/training_step") == 2
    assert names.count("stim_hf/full_forward") == 2
    assert names.count("stim_hf/subnet_forward") == 4
    assert names.count("Optimizer.step#SGD.step") == 2
    summary = (directory / "rank0_steps2-3.txt").read_text()
    assert summary.startswith("steps 2-3: 2 optimizer steps, ")
    for line in ("stim_hf/training_step", "  stim_hf/subnet_forward", "  backward and the rest"):
        assert line in summary
    assert "aten::convolution_backward" in summary  # the operator table


def test_evaluation_and_checkpoints_in_the_window_are_labelled_and_left_out(tmp_path, tiny_cifar_resnet):
    """An evaluation (made 3 s slower) and a checkpoint at step 2 do not count in the time per step.

    Counted, the window's two steps would average over 1.5 s; a tiny model's step stays far below that
    even on a loaded machine (about 0.2 s with 2 threads there)."""
    import time

    data = make_tensor_dataset(48)
    args = make_args(
        tmp_path, profile_steps="2-3", eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2
    )
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=data, eval_dataset=data)
    trainer._maybe_recalibrate_bn = lambda: time.sleep(3.0)  # runs first thing in every evaluation
    trainer.train()
    names = trace_names(tmp_path / "profile" / "rank0_steps2-3.pt.trace.json")
    assert names.count("stim_hf/full_forward") == 2  # the evaluation's forwards are not the training's
    assert names.count("stim_hf/evaluate") == 1 and names.count("stim_hf/save_checkpoint") == 1
    summary = (tmp_path / "profile" / "rank0_steps2-3.txt").read_text()
    per_step_ms = float(summary.split(" ms per step")[0].rsplit(" ", 1)[-1])
    left_out_ms = float(summary.split("checkpoints, ")[1].split(" ms, left out")[0])
    assert left_out_ms > 3000 and per_step_ms < 1500


def test_a_window_past_the_end_of_training_writes_what_it_recorded(tmp_path, tiny_cifar_resnet):
    args = make_args(tmp_path, profile_steps="4-50", num_subnets=1)
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=make_tensor_dataset(48))
    trainer.train()
    names = trace_names(tmp_path / "profile" / "rank0_steps4-5.pt.trace.json")
    assert names.count("stim_hf/training_step") == 2 and names.count("stim_hf/subnet_forward") == 2


def test_without_a_window_nothing_is_recorded(tmp_path, tiny_cifar_resnet):
    trainer = StimulativeTrainer(
        model=tiny_cifar_resnet(), args=make_args(tmp_path), train_dataset=make_tensor_dataset(48)
    )
    trainer.train()
    assert not (tmp_path / "profile").exists()


@pytest.mark.parametrize(
    ("value", "window"),
    [("20-25", (20, 25)), (" 3 - 3 ", (3, 3)), ("7", (7, 7)), (7, (7, 7)), (None, None), ("", None)],
)
def test_profile_steps_forms(value, window):
    assert parse_profile_steps(value) == window


@pytest.mark.parametrize("value", ["25-20", "0-3", "0", "steps 2-3", "2:3", True, "-1"])
def test_a_bad_window_is_refused_before_training(tmp_path, value):
    with pytest.raises(ConfigError, match=r"profile_steps=.* write 'FIRST-LAST' \(e.g. '20-25'"):
        make_args(tmp_path, profile_steps=value)


def test_profile_steps_from_the_command_line(tmp_path):
    quickstart = str(REPO_ROOT / "configs" / "quickstart.yaml")
    *_, training_args = parse_train_args([quickstart, "--output_dir", str(tmp_path), "--profile_steps", "10-12"])
    assert parse_profile_steps(training_args.profile_steps) == (10, 12)

"""A collapsed run says so while it trains (stim_hf.training.collapse), and a healthy one does not."""

import json
import logging
import math
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState

from stim_hf import StimulativeTrainingArguments
from stim_hf.errors import ConfigError
from stim_hf.training.collapse import CollapseMonitorCallback, TrainingCollapseError
from stim_hf.training.metrics import build_compute_metrics, top1_prediction_share

LN10 = math.log(10)


class _Model:
    class config:  # noqa: N801  (stands in for a model's config)
        num_labels = 10


def _monitor(tmp_path, action="warn", **kwargs):
    args = StimulativeTrainingArguments(output_dir=str(tmp_path), kl_coef=10.0, report_to="none", **kwargs)
    monitor = CollapseMonitorCallback(args.on_collapse if action is None else action)
    state, control = TrainerState(), TrainerControl()
    monitor.on_train_begin(args, state, control, model=_Model())
    return monitor, args, state, control


def _train_log(monitor, args, state, control, epoch, ce, kl=0.002):
    state.epoch, state.global_step = epoch, int(epoch * 40)
    monitor.on_log(args, state, control, logs={"loss": ce + 10 * kl, "ce_loss": ce, "kl_loss": kl})


def _evaluation(monitor, args, state, control, epoch, accuracy, share=0.2):
    state.epoch = epoch
    metrics = {"eval_loss": 2.3, "eval_accuracy": accuracy, "eval_top5_accuracy": 0.9, "eval_runtime": 1.0}
    metrics["eval_top1_prediction_share"] = share
    monitor.on_evaluate(args, state, control, metrics=metrics)


def test_training_cross_entropy_at_ln_c_is_reported_naming_lambda_and_the_remedy(tmp_path, caplog):
    monitor, args, state, control = _monitor(tmp_path)
    with caplog.at_level(logging.WARNING, logger="stim_hf.training.collapse"):
        for epoch in (0.25, 0.5, 0.75, 1.0, 1.25):
            _train_log(monitor, args, state, control, epoch, ce=2.45)
        assert not monitor.reports  # the first epoch does not count; 1.0 and 1.25 are two logs
        _train_log(monitor, args, state, control, 1.5, ce=2.44)  # three logs over half an epoch
    assert len(monitor.reports) == 1
    message = monitor.reports[0]
    assert "ln 10 = 2.303" in message and "kl_coef=10" in message and "cosine_up" in message
    assert "stim_start_epoch" in message and "learning_rate" in message
    assert "training has collapsed" in caplog.text
    assert state.log_history[-1]["collapse"] == message


def test_first_epoch_and_a_cross_entropy_that_recovers_are_not_collapse(tmp_path):
    monitor, args, state, control = _monitor(tmp_path)
    for epoch in (0.25, 0.5, 0.75, 1.0):
        _train_log(monitor, args, state, control, epoch, ce=3.0)  # every run starts at about ln C
    _train_log(monitor, args, state, control, 1.25, ce=2.3)
    _train_log(monitor, args, state, control, 1.5, ce=1.9)  # learning: the streak ends
    _train_log(monitor, args, state, control, 1.75, ce=2.3)
    _train_log(monitor, args, state, control, 2.0, ce=2.3)
    assert not monitor.reports
    # A healthy run's cross-entropy well below ln C never counts.
    for step in range(20):
        _train_log(monitor, args, state, control, 2.25 + step / 4, ce=0.9 * 0.95 * LN10)
    assert not monitor.reports


def test_evaluations_at_chance_twice_in_a_row_are_reported(tmp_path):
    monitor, args, state, control = _monitor(tmp_path)
    _evaluation(monitor, args, state, control, 0.5, accuracy=0.1)  # grace period
    _evaluation(monitor, args, state, control, 1.0, accuracy=0.098)  # a healthy run can do this once
    assert not monitor.reports
    _evaluation(monitor, args, state, control, 2.0, accuracy=0.35)
    _evaluation(monitor, args, state, control, 3.0, accuracy=0.105)
    assert not monitor.reports
    _evaluation(monitor, args, state, control, 4.0, accuracy=0.102)
    assert len(monitor.reports) == 1 and "chance for 10 classes" in monitor.reports[0]
    _evaluation(monitor, args, state, control, 5.0, accuracy=0.1)
    assert len(monitor.reports) == 1  # reported once


def test_a_near_constant_predictor_is_reported_even_above_chance(tmp_path):
    monitor, args, state, control = _monitor(tmp_path)
    _evaluation(monitor, args, state, control, 1.0, accuracy=0.149, share=0.95)
    _evaluation(monitor, args, state, control, 2.0, accuracy=0.149, share=0.93)
    assert len(monitor.reports) == 1 and "93.0% of the images predicted as one class" in monitor.reports[0]


def test_stop_raises_and_ignore_says_nothing(tmp_path):
    monitor, args, state, control = _monitor(tmp_path, action="stop")
    _evaluation(monitor, args, state, control, 1.0, accuracy=0.1)
    with pytest.raises(TrainingCollapseError, match="on_collapse=stop"):
        _evaluation(monitor, args, state, control, 2.0, accuracy=0.1)
    monitor, args, state, control = _monitor(tmp_path, action="ignore")
    for epoch in range(1, 6):
        _evaluation(monitor, args, state, control, epoch, accuracy=0.1)
        _train_log(monitor, args, state, control, epoch, ce=2.5)
    assert not monitor.reports


def test_the_remedy_follows_the_lambda_in_effect(tmp_path):
    # lambda still small (cosine_up early on): the learning rate, not the KL term, is the likely cause.
    args = StimulativeTrainingArguments(
        output_dir=str(tmp_path), kl_coef=5.0, kl_coef_schedule="cosine_up", report_to="none"
    )
    monitor, state, control = (
        CollapseMonitorCallback("warn", kl_coef_now=lambda: 0.25),
        TrainerState(),
        TrainerControl(),
    )
    monitor.on_train_begin(args, state, control, model=_Model())
    _evaluation(monitor, args, state, control, 1.0, accuracy=0.1)
    _evaluation(monitor, args, state, control, 2.0, accuracy=0.1)
    message = monitor.reports[0]
    assert "kl_coef=5 (kl_coef_schedule=cosine_up" in message and "0.25 in effect at this step" in message
    assert "Lambda is still below 1" in message and "warmup_steps" in message
    assert "bring lambda in" not in message  # cosine_up is already set
    # lambda large under cosine_up: a smaller kl_coef, and no advice to use the schedule it already has.
    monitor, state, control = CollapseMonitorCallback("warn", kl_coef_now=lambda: 4.0), TrainerState(), TrainerControl()
    monitor.on_train_begin(args, state, control, model=_Model())
    _evaluation(monitor, args, state, control, 1.0, accuracy=0.1)
    _evaluation(monitor, args, state, control, 2.0, accuracy=0.1)
    message = monitor.reports[0]
    assert "4 in effect" in message and "a smaller kl_coef" in message and "bring lambda in" not in message


def test_a_run_that_recovers_after_the_warning_says_so_once(tmp_path, caplog):
    monitor, args, state, control = _monitor(tmp_path)
    _evaluation(monitor, args, state, control, 1.0, accuracy=0.1)
    _evaluation(monitor, args, state, control, 2.0, accuracy=0.1)
    assert len(monitor.reports) == 1 and monitor.recovery is None
    _evaluation(monitor, args, state, control, 3.0, accuracy=0.18)  # above chance, not yet clearly
    _evaluation(monitor, args, state, control, 4.0, accuracy=0.3, share=0.95)  # one class for nearly everything
    assert monitor.recovery is None
    state.global_step = 200
    with caplog.at_level(logging.WARNING, logger="stim_hf.training.collapse"):
        _evaluation(monitor, args, state, control, 5.0, accuracy=0.31)
        _evaluation(monitor, args, state, control, 6.0, accuracy=0.35)
    assert "recovered from the collapse reported at step" in monitor.recovery and "top-1 31.00%" in monitor.recovery
    assert caplog.text.count("has recovered") == 1
    assert [e["collapse_recovered"] for e in state.log_history if "collapse_recovered" in e] == [monitor.recovery]
    assert len(monitor.reports) == 1


def test_common_training_gets_its_own_remedy(tmp_path):
    args = StimulativeTrainingArguments(output_dir=str(tmp_path), stim_method="ct", report_to="none")
    monitor, state, control = CollapseMonitorCallback("warn"), TrainerState(), TrainerControl()
    monitor.on_train_begin(args, state, control, model=_Model())
    for epoch in (1.0, 1.5, 2.0):
        _train_log(monitor, args, state, control, epoch, ce=2.4)
    assert "common training" in monitor.reports[0] and "max_grad_norm" in monitor.reports[0]


def test_on_collapse_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="on_collapse='panic' is not valid; choose one of: warn, stop, ignore"):
        StimulativeTrainingArguments(output_dir=str(tmp_path), on_collapse="panic", report_to="none")


def test_compute_metrics_reports_the_top1_prediction_share():
    import numpy as np
    from transformers import EvalPrediction

    top = np.array([[3, 1], [3, 2], [3, 0], [1, 3]])
    metrics = build_compute_metrics(ks=(1, 2))(EvalPrediction(predictions=top, label_ids=np.array([3, 3, 0, 1])))
    assert metrics["accuracy"] == 0.75 and metrics["top1_prediction_share"] == 0.75
    assert top1_prediction_share(np.array([], dtype=np.int64)) == 0.0


def _train_synthetic(tmp_path, kl_coef):
    """ST++ on a learnable synthetic set (the issue's lambda = 10 pilot, reduced: a ResNet-14 on 512 images)."""
    import torch
    from conftest import make_tensor_dataset

    from stim_hf import StimulativeTrainer
    from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification
    from stim_hf.training.metrics import top_k_indices

    torch.manual_seed(0)
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=14, widths=[8, 16, 32], num_labels=10))
    args = StimulativeTrainingArguments(
        output_dir=str(tmp_path / f"kl{kl_coef:g}"),
        stim_method="stpp",
        kl_coef=kl_coef,
        num_train_epochs=3,
        per_device_train_batch_size=32,
        learning_rate=0.1,
        optim="sgd",
        optim_args="momentum=0.9,nesterov=true",
        weight_decay=5e-4,
        lr_scheduler_type="cosine",
        max_grad_norm=0.0,
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=4,
        report_to="none",
        use_cpu=True,
        seed=1,
        disable_tqdm=True,
        num_eval_subnets=0,
    )
    trainer = StimulativeTrainer(
        model=model,
        args=args,
        train_dataset=make_tensor_dataset(n=512, size=16, seed=0),
        eval_dataset=make_tensor_dataset(n=256, size=16, seed=1),
        compute_metrics=build_compute_metrics(),
        preprocess_logits_for_metrics=top_k_indices,
    )
    trainer.train()
    return trainer


def test_a_real_run_that_collapses_says_so_while_it_trains_and_a_healthy_one_does_not(tmp_path, caplog):
    # The tiny model needs a larger lambda than the pilot's ResNet-20 to collapse the same way: the first
    # steps blow the cross-entropy up to about 10, then it sits at ln 10 with the KL near 0.
    with caplog.at_level(logging.WARNING, logger="stim_hf.training.collapse"):
        collapsed = _train_synthetic(tmp_path, kl_coef=50.0)
    assert len(collapsed.collapse_monitor.reports) == 1, [e for e in collapsed.state.log_history if "eval_loss" in e]
    report = collapsed.collapse_monitor.reports[0]
    assert "kl_coef=50" in report and "training has collapsed" in caplog.text
    assert "50 in effect at this step" in report  # the trainer's schedule (constant) feeds the monitor
    step = next(e["step"] for e in collapsed.state.log_history if "collapse" in e)
    assert step < collapsed.state.max_steps  # said while training, not after
    healthy = _train_synthetic(tmp_path, kl_coef=1.0)
    assert healthy.collapse_monitor.reports == []
    accuracy = [e["eval_accuracy"] for e in healthy.state.log_history if "eval_accuracy" in e]
    assert accuracy[-1] > 2 * accuracy[0] or accuracy[-1] > 0.5, accuracy  # it learned, and nothing was said


R56_START = Path(__file__).parents[1] / "docs" / "measurements" / "full_network_study" / "r56_start"


def _replay(path: Path, warmup_steps: int, evaluations: bool = True):
    """Feed a recorded run's training logs and evaluations (in step order) through a fresh monitor, with the
    recipe's arguments and the lambda last logged as the one in effect."""
    args = StimulativeTrainingArguments(
        output_dir="unused", kl_coef=5.0, kl_coef_schedule="cosine_up", kl_loss="kl", learning_rate=0.1,
        warmup_steps=warmup_steps, report_to="none",
    )  # fmt: skip
    logged = {"kl_coef": 0.0}
    monitor = CollapseMonitorCallback("warn", kl_coef_now=lambda: logged["kl_coef"])
    state, control = TrainerState(), TrainerControl()
    state.max_steps = 78_200  # the recipe's 200 epochs of 391 steps
    monitor.on_train_begin(args, state, control, model=_Model())
    for record in map(json.loads, path.read_text().splitlines()):
        state.epoch, state.global_step = record["epoch"], record["step"]
        if "eval_accuracy" in record:
            if evaluations:
                monitor.on_evaluate(args, state, control, metrics=record)
        else:
            logged["kl_coef"] = record["kl_coef"]
            monitor.on_log(args, state, control, logs=record)
    return monitor, state


@pytest.mark.parametrize("run", ["stpp_s1", "stpp_s2", "stpp_s1_wu1", "stpp_s2_wu1", "stpp_s3_wu1"])
def test_recorded_full_data_resnet56_starts_that_learn_are_not_reported(run):
    # The ResNet-56 recipe's first 800 steps on all of CIFAR-10 (docs/results.md), with and without a one-epoch
    # warm-up: within the first epoch, yet past the grace steps, and healthy.
    monitor, _ = _replay(R56_START / f"{run}_logs.jsonl", warmup_steps=391 if run.endswith("wu1") else 0)
    assert monitor.reports == []


def test_a_recorded_stall_inside_a_long_first_epoch_is_reported_and_its_recovery_too():
    # Seed 3 without warm-up: 91-94 % of the test images on one class at steps 100 and 200 (of 391 in the epoch),
    # the cross-entropy at 0.99 ln 10 until about step 300; then it learned.
    monitor, state = _replay(R56_START / "stpp_s3_logs.jsonl", warmup_steps=0)
    assert len(monitor.reports) == 1 and "near-constant predictor" in monitor.reports[0]
    assert "at step 200 (epoch 0.51)" in monitor.reports[0]
    assert "Lambda is still below 1" in monitor.reports[0]  # cosine_up: the KL term is not the suspect
    assert "reported at step 200" in monitor.recovery and "at step 400" in monitor.recovery
    # The recipe evaluates once an epoch: its training cross-entropy alone tells the stall a little later.
    monitor, _ = _replay(R56_START / "stpp_s3_logs.jsonl", warmup_steps=0, evaluations=False)
    assert len(monitor.reports) == 1 and "cross-entropy has stayed at about ln 10" in monitor.reports[0]
    assert "at step 300 (epoch 0.77)" in monitor.reports[0]
    # The grace follows the warm-up: the same records under a 391-step warm-up fall inside it.
    monitor, _ = _replay(R56_START / "stpp_s3_logs.jsonl", warmup_steps=391)
    assert monitor.reports == []

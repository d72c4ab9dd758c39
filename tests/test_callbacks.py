"""The sub-network monitor: TensorBoard scalars, histograms and image; metrics in log_history."""

import functools
import glob
import os

import pytest
from conftest import make_tensor_dataset
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments
from stim_hf.training.callbacks import SubnetMonitorCallback
from stim_hf.training.metrics import build_compute_metrics, top_k_indices

SCALARS = ("eval/subnet_accuracy_mean", "eval/subnet_accuracy_min", "eval/subnet_accuracy_max")
INHERITED = tuple(f"{tag}_inherited_bn" for tag in SCALARS)  # beside them: the full network's BN statistics
HISTOGRAMS = ("train/subnet_depth_fraction", "train/subnet_input_size")


_dataset = functools.partial(make_tensor_dataset, n=48)


def _train(tmp_path, model, report_to, with_metrics=True, **kwargs):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        stim_method="stpp",
        num_subnets=2,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=48,
        learning_rate=0.05,
        optim="sgd",
        max_steps=4,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to=report_to,
        use_cpu=True,
        disable_tqdm=True,
        seed=3,
        subnet_monitor_count=3,
    )
    settings.update(kwargs)
    data = _dataset()
    trainer = StimulativeTrainer(
        model=model,
        args=StimulativeTrainingArguments(**settings),
        train_dataset=data,
        eval_dataset=data,
        compute_metrics=build_compute_metrics() if with_metrics else None,
        preprocess_logits_for_metrics=top_k_indices if with_metrics else None,
    )
    trainer.train()
    return trainer


def _events(output_dir):
    runs = glob.glob(os.path.join(output_dir, "runs", "*"))
    assert len(runs) == 1, runs
    accumulator = EventAccumulator(runs[0], size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("report_to", ["tensorboard", "none"])
def test_monitor_writes_tensorboard_events_and_log_history(tmp_path, tiny_cifar_resnet, report_to):
    trainer = _train(tmp_path, tiny_cifar_resnet(), report_to)
    monitors = [c for c in trainer.callback_handler.callbacks if isinstance(c, SubnetMonitorCallback)]
    assert len(monitors) == 1
    metrics = trainer.evaluate()  # after training too (the TensorBoard callback closed its writer)
    for name in ("mean", "min", "max"):
        assert 0.0 <= metrics[f"eval_subnet_accuracy_{name}"] <= 1.0
        assert 0.0 <= metrics[f"eval_subnet_accuracy_{name}_inherited_bn"] <= 1.0
    assert metrics["eval_subnet_accuracy_min"] <= metrics["eval_subnet_accuracy_mean"]

    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evaluations] == [2, 4, 4]
    assert all("eval_subnet_accuracy_mean" in e for e in evaluations)

    events = _events(trainer.args.output_dir)
    tags = events.Tags()
    for tag in SCALARS + INHERITED:
        assert [s.step for s in events.Scalars(tag)] == [2, 4, 4]
    mean = [s.value for s in events.Scalars(SCALARS[0])]
    assert mean == pytest.approx([e["eval_subnet_accuracy_mean"] for e in evaluations])
    for tag in HISTOGRAMS:
        assert tag in tags["histograms"]
        histograms = events.Histograms(tag)
        assert [h.step for h in histograms] == [2, 4]
        assert all(h.histogram_value.num == 2 * 2 for h in histograms)  # 2 steps x 2 sub-networks per log
    depth = events.Histograms(HISTOGRAMS[0])[0].histogram_value
    assert 0 < depth.min <= depth.max < 1
    images = events.Images("eval/loafing")
    assert [i.step for i in images] == [2, 4, 4] and images[0].width > 100
    if report_to == "tensorboard":  # the same run as the Trainer's own scalars
        assert "eval/accuracy" in tags["scalars"] and "train/loss" in tags["scalars"]
    assert not trainer.sampled_subnets  # drained at every log


def test_monitor_every_second_evaluation_without_compute_metrics(tmp_path, tiny_cifar_resnet):
    """Also without re-estimation (subnet_bn_recalibration_samples: 0): the inherited figures only, unsuffixed."""
    trainer = _train(
        tmp_path,
        tiny_cifar_resnet(),
        "none",
        with_metrics=False,
        subnet_monitor_every=2,
        num_subnets=1,
        subnet_bn_recalibration_samples=0,
    )
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert "eval_accuracy" not in evaluations[0]
    assert ["eval_subnet_accuracy_mean" in e for e in evaluations] == [False, True]
    assert not any(key.endswith("_inherited_bn") for e in evaluations for key in e)
    events = _events(trainer.args.output_dir)
    assert [s.step for s in events.Scalars(SCALARS[0])] == [4]
    assert INHERITED[0] not in events.Tags()["scalars"]
    assert [i.step for i in events.Images("eval/loafing")] == [4]  # full network measured for the plot


def test_monitor_leaves_training_unchanged(tmp_path, tiny_cifar_resnet):
    """Re-estimating the monitored sub-networks' statistics at every evaluation changes nothing in training."""
    runs = {}
    for count in (0, 3):
        trainer = _train(tmp_path / str(count), tiny_cifar_resnet(), "none", subnet_monitor_count=count)
        runs[count] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for key, value in runs[0].items():
        assert value.equal(runs[3][key]), key


@pytest.mark.parametrize("report_to", ["tensorboard", "none"])
def test_final_report_goes_to_the_runs_events(tmp_path, tiny_cifar_resnet, report_to):
    """The end-of-training report (stim-hf train's printout) in the same run: text table, scalars, loafing image."""
    from tensorboard.util import tensor_util

    from stim_hf.training.callbacks import log_subnet_report

    trainer = _train(tmp_path, tiny_cifar_resnet(), report_to)
    metrics = trainer.evaluate()
    results = trainer.evaluate_subnets(num_subnets=2)
    assert log_subnet_report(trainer, metrics, results)
    events = _events(trainer.args.output_dir)
    assert [s.value for s in events.Scalars("final/accuracy")] == [pytest.approx(metrics["eval_accuracy"])]
    mean = sum(r["accuracy"] for r in results) / 2
    assert [s.value for s in events.Scalars("final/subnet_accuracy_mean")] == [pytest.approx(mean)]
    assert [s.step for s in events.Scalars("final/subnet_accuracy_mean_inherited_bn")] == [4]
    (text,) = events.Tensors("final/report/text_summary")
    table = tensor_util.make_ndarray(text.tensor_proto).item().decode()
    assert table.count("| sub-network ") == 2 and f"| {100 * results[1]['accuracy']:.2f}% |" in table
    assert [i.step for i in events.Images("final/loafing")] == [4]


def test_final_report_writes_nothing_where_no_events_were_asked_for(tmp_path, tiny_cifar_resnet):
    from stim_hf.training.callbacks import log_subnet_report

    trainer = _train(tmp_path, tiny_cifar_resnet(), "none", subnet_monitor_count=0)
    assert not log_subnet_report(trainer, trainer.evaluate(), trainer.evaluate_subnets(num_subnets=2))
    assert not (tmp_path / "out" / "runs").exists()

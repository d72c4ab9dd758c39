"""Monitoring stimulative training in TensorBoard: sub-network accuracy and the sampled sub-networks.

:class:`SubnetMonitorCallback` is added by :class:`~stim_hf.training.trainer.StimulativeTrainer` when
``subnet_monitor_count > 0``. At every ``subnet_monitor_every``-th evaluation it evaluates the
trainer's fixed sub-networks (``trainer.fixed_subnets(subnet_monitor_count)``: the same ones at
every evaluation and in ``stim-hf loafing`` with the same seed) on the evaluation data and logs

- ``eval/subnet_accuracy_mean``, ``eval/subnet_accuracy_min``, ``eval/subnet_accuracy_max``, each
  sub-network scored with BatchNorm statistics re-estimated for it on
  ``subnet_bn_recalibration_samples`` training images, and ``eval/subnet_accuracy_mean_inherited_bn``
  (``_min``, ``_max``), with the full network's statistics (scalars; also added to the
  evaluation's metrics and to its ``state.log_history`` entry as ``eval_subnet_accuracy_*``);
  with ``subnet_bn_recalibration_samples: 0`` only the first three, with the full network's
  statistics,
- ``eval/loafing`` (an image: sub-network accuracy against FLOP share, full network marked);

and at every log during training it writes histograms of the sub-networks drawn since the last
log: ``train/subnet_depth_fraction`` and ``train/subnet_input_size``.

Events go through the ``SummaryWriter`` of the Trainer's ``TensorBoardCallback`` when there is
one (``report_to: tensorboard``), so they land in the same run; otherwise through a writer of
its own in the directory that callback would use (``TENSORBOARD_LOGGING_DIR``, else
``output_dir/runs/<date>_<host>``). Only the main process writes; every process evaluates (the
evaluation data is sharded and the results gathered).

:func:`log_subnet_report` writes the end-of-training sub-network report (what ``stim-hf train`` prints)
into the same events: ``final/report`` (text), ``final/accuracy``, ``final/subnet_accuracy_*`` and
``final/loafing``.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback, rewrite_logs
from transformers.integrations.integration_utils import default_logdir

from stim_hf.analysis.evaluation import evaluate_model
from stim_hf.analysis.flops import count_flops
from stim_hf.analysis.plotting import LoafingSeries, figure_to_array, plot_loafing
from stim_hf.method import Subnet
from stim_hf.method.batchnorm import preserved_rng_state

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn
    from torch.utils.tensorboard import SummaryWriter

    from stim_hf.method import ResidualStage

logger = logging.getLogger(__name__)

SUBNET_METRICS = ("subnet_accuracy_mean", "subnet_accuracy_min", "subnet_accuracy_max")
"""Metric names the monitor adds, after the evaluation prefix (``eval_subnet_accuracy_mean``...); with
re-estimated BatchNorm statistics also each of them with the suffix ``_inherited_bn``."""

REPORT_TAG = "final"
"""TensorBoard group of :func:`log_subnet_report`: ``final/report``, ``final/accuracy``, ``final/loafing``, ..."""


class MonitoredTrainer(Protocol):
    """What :class:`SubnetMonitorCallback` uses of the trainer it watches.

    :class:`~stim_hf.training.trainer.StimulativeTrainer` is one. Typed here instead of imported, so that
    the trainer imports this module and not the other way round (``docs/architecture.md``).
    """

    args: TrainingArguments
    state: TrainerState
    model: nn.Module
    accelerator: Accelerator
    stages: list[ResidualStage] | None
    eval_dataset: Any
    data_collator: Any
    callback_handler: Any
    sampled_subnets: deque[tuple[int, float, int]]

    def fixed_subnets(self, num_subnets: int, seed: int | None = None) -> list[Subnet]: ...

    def is_world_process_zero(self) -> bool: ...

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Iterator[dict[str, Any]]: ...

    def subnet_bn_statistics(self, subnet: Subnet | None, batches: Any) -> AbstractContextManager[int]: ...

    def _subnet_estimation_batches(self, num_samples: int) -> Any: ...

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]: ...


class SubnetMonitorCallback(TrainerCallback):
    """Log fixed sub-networks' accuracy and the sampled sub-networks to TensorBoard during training.

    ``trainer`` is the :class:`~stim_hf.training.trainer.StimulativeTrainer` being monitored (its
    ``fixed_subnets``, ``stages``, ``sampled_subnets`` and evaluation data are used). The settings
    are read from its arguments at each event: ``subnet_monitor_count`` sub-networks, at every
    ``subnet_monitor_every``-th evaluation.
    """

    def __init__(self, trainer: MonitoredTrainer) -> None:
        self.trainer = trainer
        self.num_evaluations = 0
        self._flop_shares: dict[tuple, float] = {}
        self._own_writer: SummaryWriter | None = None
        self._own_log_dir: str | None = None
        self._warned_no_data = False

    # -- events -------------------------------------------------------------------------------------

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Evaluate the fixed sub-networks and log their accuracy (every ``subnet_monitor_every``-th time)."""
        trainer = self.trainer
        count = getattr(args, "subnet_monitor_count", 0)
        if not count or trainer.stages is None or metrics is None:
            return
        self.num_evaluations += 1
        if self.num_evaluations % max(1, getattr(args, "subnet_monitor_every", 1)):
            return
        prefix = _metric_prefix(metrics)
        dataset = self._eval_dataset(prefix)
        if dataset is None:
            return
        subnets = trainer.fixed_subnets(count)
        if not subnets:
            return
        # Without compute_metrics there is no full-network accuracy for the plot: measure it too
        # (on every process, since evaluation gathers across processes).
        full_accuracy = metrics.get(f"{prefix}_accuracy")
        networks: list[Subnet | None] = list(subnets) if full_accuracy is not None else [*subnets, None]
        accuracies, inherited, shares = self._evaluate(dataset, networks)
        if full_accuracy is None:
            full_accuracy = accuracies.pop()
            shares.pop()
            if inherited is not None:
                inherited.pop()
        values = {}
        for suffix, scores in (("", accuracies), ("_inherited_bn", inherited)):
            if scores is None:
                continue  # not re-estimated: the figures above are the inherited ones
            values[f"{prefix}_subnet_accuracy_mean{suffix}"] = float(np.mean(scores))
            values[f"{prefix}_subnet_accuracy_min{suffix}"] = float(np.min(scores))
            values[f"{prefix}_subnet_accuracy_max{suffix}"] = float(np.max(scores))
        # Trainer.evaluate logged its metrics (log_history, report_to) *before* on_evaluate: add the
        # values to the returned metrics and to that log_history entry; write TensorBoard ourselves.
        metrics.update(values)
        entry = _log_entry(state, prefix)
        if entry is not None:
            entry.update(values)
        if not state.is_world_process_zero:
            return
        writer = self._writer(args)
        for tag, value in rewrite_logs(values).items():
            writer.add_scalar(tag, value, state.global_step)
        figure = plot_loafing(
            [
                LoafingSeries(  # as the papers draw it: filled, inherited statistics; hollow, re-estimated
                    f"step {state.global_step}",
                    float(full_accuracy),
                    shares,
                    accuracies if inherited is None else inherited,
                    None if inherited is None else accuracies,
                )
            ],
            title=f"Loafing at step {state.global_step} ({len(subnets)} fixed sub-networks; dashed: mean)",
            chance=_chance(trainer),
        )
        image_tag = next(iter(rewrite_logs({f"{prefix}_loafing": 0})))
        writer.add_image(image_tag, figure_to_array(figure), state.global_step, dataformats="HWC")
        writer.flush()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write histograms of the sub-networks sampled since the last log (and forget them)."""
        sampled = self.trainer.sampled_subnets
        if not sampled:
            return
        draws = list(sampled)
        sampled.clear()
        if not state.is_world_process_zero:
            return
        writer = self._writer(args)
        writer.add_histogram("train/subnet_depth_fraction", np.array([d[1] for d in draws]), state.global_step)
        writer.add_histogram("train/subnet_input_size", np.array([d[2] for d in draws]), state.global_step)
        writer.flush()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Close this callback's own writer, if it has one (a later evaluation reopens the same folder)."""
        self.close_writer()

    def close_writer(self) -> None:
        """Close this callback's own ``SummaryWriter``, if it opened one; a later event reopens the same folder."""
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None

    # -- helpers ------------------------------------------------------------------------------------

    def _eval_dataset(self, prefix: str):
        data = self.trainer.eval_dataset
        if isinstance(data, dict):
            name = prefix.removeprefix("eval_") if prefix != "eval" else None
            data = data.get(name) if name is not None else None
        if data is None and not self._warned_no_data:
            self._warned_no_data = True
            logger.warning(
                "subnet monitor: no evaluation dataset for metrics prefix '%s' (pass eval_dataset to the "
                "trainer); sub-networks are not monitored",
                prefix,
            )
        return data

    def _evaluate(self, dataset, subnets: list[Subnet | None]) -> tuple[list[float], list[float] | None, list[float]]:
        """Accuracy, accuracy with the full network's BatchNorm statistics, and FLOP share of each network.

        ``None`` in ``subnets`` is the full network, as trained. The first list holds the accuracies
        with statistics re-estimated for each sub-network; without re-estimation
        (``subnet_bn_recalibration_samples: 0``, or no training data) they are the inherited ones
        and the second list is None.
        """
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        gather = trainer.accelerator.gather_for_metrics
        estimation = trainer._subnet_estimation_batches(trainer.args.subnet_bn_recalibration_samples)
        # Evaluation draws a DataLoader seed from torch's RNG: keep the training stream unchanged.
        with preserved_rng_state():
            loader = trainer.get_eval_dataloader(dataset)
            batches = _PreparedBatches(trainer, loader)
            inherited = [
                evaluate_model(model, batches, trainer.stages, subnet, gather=gather)["accuracy"] for subnet in subnets
            ]
            own = None
            if estimation is not None:
                own = []
                for subnet, score in zip(subnets, inherited, strict=True):
                    if subnet is None:
                        own.append(score)
                        continue
                    with trainer.subnet_bn_statistics(subnet, estimation):
                        own.append(evaluate_model(model, batches, trainer.stages, subnet, gather=gather)["accuracy"])
        shares = _flop_shares(trainer, dataset, subnets, self._flop_shares)
        return (own, inherited, shares) if own is not None else (inherited, None, shares)

    def _writer(self, args: TrainingArguments) -> SummaryWriter:
        shared = _tensorboard_writer(self.trainer)
        if shared is not None:
            return shared
        if self._own_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            if self._own_log_dir is None:
                tensorboard = next(
                    (c for c in self.trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None
                )
                log_dir = tensorboard.logging_dir if tensorboard is not None else None
                log_dir = log_dir or os.getenv("TENSORBOARD_LOGGING_DIR")
                self._own_log_dir = os.path.expanduser(log_dir or os.path.join(args.output_dir, default_logdir()))
            self._own_writer = SummaryWriter(log_dir=self._own_log_dir)
        return self._own_writer


def log_subnet_report(
    trainer: MonitoredTrainer, eval_metrics: dict[str, Any], subnet_results: list[dict[str, Any]]
) -> bool:
    """Write the end-of-training sub-network report into the run's TensorBoard events; whether it was written.

    ``subnet_results`` are :meth:`~stim_hf.training.trainer.StimulativeTrainer.evaluate_subnets`'s,
    ``eval_metrics`` the final evaluation's (``eval_accuracy``, ``eval_subnet_accuracy_*`` as
    ``stim-hf train`` summarises them). At the trainer's current step it writes

    - ``final/report`` (text): a Markdown table of the full network and each sub-network, their
      share of the blocks and of the FLOPs, top-1 with BatchNorm statistics re-estimated for each
      and with the full network's (inherited), and the mean: the figures ``stim-hf train`` prints;
    - ``final/accuracy``, ``final/subnet_accuracy_mean`` (``_min``, ``_max``, and each with
      ``_inherited_bn`` when re-estimated) as scalars;
    - ``final/loafing`` (image): those sub-networks' accuracy against their FLOP share.

    The events go to the Trainer's TensorBoard run (``report_to: tensorboard``), else to the
    sub-network monitor's when it is on; with neither, nothing is written (no event files were
    asked for). Only the main process writes.
    """
    if not subnet_results or trainer.stages is None or not trainer.is_world_process_zero():
        return False
    monitor = next((c for c in trainer.callback_handler.callbacks if isinstance(c, SubnetMonitorCallback)), None)
    writer = _tensorboard_writer(trainer)
    if writer is None and monitor is not None:
        writer = monitor._writer(trainer.args)
    if writer is None:
        return False
    step = trainer.state.global_step
    num_blocks = tuple(stage.num_blocks for stage in trainer.stages)
    subnets = [Subnet(tuple(tuple(kept) for kept in r["kept"]), num_blocks) for r in subnet_results]
    dataset = trainer.eval_dataset
    if isinstance(dataset, dict):  # several evaluation sets: the shares are counted at the first one's size
        dataset = next(iter(dataset.values()))
    shares = _flop_shares(trainer, dataset, subnets, monitor._flop_shares if monitor else {})
    full_accuracy = eval_metrics.get("eval_accuracy")
    re_estimated = bool(subnet_results[0]["bn_recalibration_samples"])
    own = [float(r["accuracy"]) for r in subnet_results]
    inherited = [float(r["accuracy_inherited_bn"]) for r in subnet_results]

    report = _report_markdown(full_accuracy, num_blocks, subnet_results, shares, step)
    writer.add_text(f"{REPORT_TAG}/report", report, step)
    scalars = {} if full_accuracy is None else {"accuracy": float(full_accuracy)}
    for suffix, scores in (("", own), ("_inherited_bn", inherited if re_estimated else None)):
        if scores is not None:
            scalars.update(
                {
                    f"subnet_accuracy_mean{suffix}": float(np.mean(scores)),
                    f"subnet_accuracy_min{suffix}": float(np.min(scores)),
                    f"subnet_accuracy_max{suffix}": float(np.max(scores)),
                }
            )
    for name, value in scalars.items():
        writer.add_scalar(f"{REPORT_TAG}/{name}", value, step)
    figure = plot_loafing(
        [
            LoafingSeries(
                f"step {step}",
                float("nan") if full_accuracy is None else float(full_accuracy),
                shares,
                inherited,
                own if re_estimated else None,
            )
        ],
        title=f"Loafing at the end of training, step {step} ({len(subnets)} fixed sub-networks; dashed: mean)",
        chance=_chance(trainer),
    )
    writer.add_image(f"{REPORT_TAG}/loafing", figure_to_array(figure), step, dataformats="HWC")
    writer.flush()
    if monitor is not None:
        monitor.close_writer()  # its own writer, if it opened one for this; the Trainer's stays the Trainer's
    return True


def _report_markdown(
    full_accuracy: float | None,
    num_blocks: tuple[int, ...],
    subnet_results: list[dict[str, Any]],
    shares: list[float],
    step: int,
) -> str:
    """The final report as a Markdown table (TensorBoard's text dashboard renders it)."""
    samples = subnet_results[0]["bn_recalibration_samples"]

    def percent(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.2f}%"

    header = "| network | depths | blocks | FLOPs | top-1 | top-1, inherited BatchNorm statistics |"
    lines = [
        f"Step {step}. Each sub-network is scored with BatchNorm statistics re-estimated for it on {samples} "
        "training images and, beside it, with the full network's (inherited: the papers' loafing measure)."
        if samples
        else f"Step {step}. The sub-networks are scored with the full network's BatchNorm statistics (inherited).",
        "",
        header,
        "| --- | --- | --- | --- | --- | --- |",
        f"| full network | {','.join(map(str, num_blocks))} | 100% | 100% | {percent(full_accuracy)} | |",
    ]
    for index, (result, share) in enumerate(zip(subnet_results, shares, strict=True), start=1):
        inherited = percent(result["accuracy_inherited_bn"]) if samples else ""
        lines.append(
            f"| sub-network {index} | {','.join(map(str, result['depths']))} | {100 * result['depth_fraction']:.0f}% "
            f"| {100 * share:.0f}% | {percent(result['accuracy'])} | {inherited} |"
        )
    own = [r["accuracy"] for r in subnet_results]
    inherited = [r["accuracy_inherited_bn"] for r in subnet_results]
    lines.append(
        f"| mean of {len(subnet_results)} sub-networks | | | | {percent(float(np.mean(own)))} "
        f"| {percent(float(np.mean(inherited))) if samples else ''} |"
    )
    return "\n".join(lines)


def _tensorboard_writer(trainer: MonitoredTrainer) -> SummaryWriter | None:
    """The open ``SummaryWriter`` of the Trainer's ``TensorBoardCallback``, if it has one."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            return callback.tb_writer
    return None


def _flop_shares(
    trainer: MonitoredTrainer, dataset, subnets: list[Subnet | None], cache: dict[tuple, float]
) -> list[float]:
    """Each network's share of the full network's FLOPs at the evaluation size (``None``: the full network)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    # float(): a pre-decoded pipeline's uint8 images count the same FLOPs as the normalised ones.
    example = _example_input(trainer, dataset).to(next(model.parameters()).device).float()
    shares = []
    for subnet in subnets:
        key = (subnet, tuple(example.shape[1:]))
        if key not in cache:
            full = count_flops(model, example)
            part = full if subnet is None else count_flops(model, example, trainer.stages, subnet)
            cache[key] = part / full if full else float("nan")
        shares.append(cache[key])
    return shares


def _metric_prefix(metrics: dict[str, Any]) -> str:
    """The evaluation's metric prefix (``eval``, ``eval_<dataset>``), from its ``<prefix>_runtime`` key."""
    for key in metrics:
        if key.endswith("_runtime"):
            return key.removesuffix("_runtime")
    return "eval"


def _log_entry(state: TrainerState, prefix: str) -> dict[str, Any] | None:
    """The ``log_history`` entry that ``Trainer.evaluate`` just appended for this evaluation."""
    runtime = f"{prefix}_runtime"
    for entry in reversed(state.log_history):
        if entry.get("step") != state.global_step:
            return None
        if runtime in entry:
            return entry
    return None


class _PreparedBatches:
    """Re-iterable view of an evaluation loader whose batches went through the trainer's ``_prepare_inputs``.

    So batches are on the device and finished by the trainer's ``batch_transform`` (the pre-decoded
    pipeline normalises there), exactly as ``Trainer.evaluate`` sees them.
    """

    def __init__(self, trainer: MonitoredTrainer, loader) -> None:  # noqa: ANN001
        self.trainer, self.loader = trainer, loader

    def __iter__(self):  # noqa: ANN204
        return (self.trainer._prepare_inputs(batch) for batch in self.loader)


def _example_input(trainer: MonitoredTrainer, dataset) -> torch.Tensor:
    """One collated evaluation image ``(1, C, H, W)``, for counting FLOPs at the evaluation size."""
    try:
        return trainer.data_collator([dataset[0]])["pixel_values"][:1]
    except (TypeError, KeyError, IndexError, NotImplementedError):  # e.g. an IterableDataset
        with preserved_rng_state():  # the loader draws its seed from torch's RNG: keep the training stream
            return next(iter(trainer.get_eval_dataloader(dataset)))["pixel_values"][:1]


def _chance(trainer: MonitoredTrainer) -> float | None:
    num_labels = getattr(getattr(trainer.model, "config", None), "num_labels", None)
    return 1.0 / num_labels if num_labels else None

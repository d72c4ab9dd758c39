"""The stimulative ``Trainer``: full-network cross-entropy plus KL towards sampled sub-networks."""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length
from transformers.utils import SAFE_WEIGHTS_NAME, is_peft_available

from stim_hf.batchnorm import frozen_running_stats, preserved_rng_state, recalibrate_batchnorm
from stim_hf.checkpointing import (
    NONFINITE_PREFIX,
    TRAINER_STATE_NAME,
    TRAINING_ARGS_JSON_NAME,
    SeededBatchDataset,
    check_checkpoint_matches_model,
    merge_local_files,
    publish_checkpoint,
    remove_stale_staging,
    resolve_resume_checkpoint,
    rotate_checkpoints,
    staging_dir,
    write_manifest,
    write_nonfinite_report,
)
from stim_hf.config import StimulativeTrainingArguments
from stim_hf.errors import ConfigError, ModelStructureError, StimError
from stim_hf.losses import distillation_loss, normalize_logits
from stim_hf.subnets import (
    EVAL_SUBNET_STREAM,
    Subnet,
    SubnetSampler,
    find_residual_family,
    resize_for_subnet,
    use_subnet,
)

logger = logging.getLogger(__name__)

# Logged training scalars (means over the logging interval, reduced across processes).
_LOG_KEYS = ("ce_loss", "kl_loss", "kl_coef", "subnet_depth_fraction", "subnet_input_size")
# Sub-network inputs are never resized below this side, whatever min_input_scale says.
MIN_SUBNET_INPUT_SIZE = 8
# Models saved with save_pretrained (safetensors); anything else is saved as a safetensors state dict.
_SAVE_PRETRAINED_CLASSES: tuple[type, ...] = (PreTrainedModel,)
if is_peft_available():
    from peft import PeftModel

    _SAVE_PRETRAINED_CLASSES += (PeftModel,)


def kl_coef_at(base: float, schedule: str, progress: float) -> float:
    """The KL weight lambda at a training ``progress`` in [0, 1] of the stimulative phase."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return base
    if schedule == "cosine_up":
        return base * (1.0 - math.cos(math.pi * progress)) / 2.0
    if schedule == "cosine_down":
        return base * (1.0 + math.cos(math.pi * progress)) / 2.0
    raise ConfigError(f"kl_coef_schedule='{schedule}' is not valid; choose constant, cosine_up or cosine_down")


@torch.no_grad()
def average_gradients(model: nn.Module) -> None:
    """Average the gradients of ``model`` across processes in one flat all-reduce."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(reduced)


def prepare_model(model: nn.Module, args: StimulativeTrainingArguments) -> nn.Module:
    """Apply ``sync_batchnorm`` and ``channels_last`` before the Trainer wraps the model.

    SyncBatchNorm only matters with several processes, and torch implements it for accelerators
    only: with several CPU processes it is refused before training starts.
    """
    if args.sync_batchnorm and args.world_size > 1:
        if args.use_cpu or not torch.cuda.is_available():
            raise ConfigError(
                "sync_batchnorm=true needs GPUs: torch has no SyncBatchNorm for CPU processes; "
                "set sync_batchnorm: false for CPU runs"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif args.sync_batchnorm:
        logger.info("sync_batchnorm: a single process, so BatchNorm is left as is")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class NonFiniteLossError(StimError, FloatingPointError):
    """A training step produced a NaN or infinite loss (``on_nonfinite_loss: stop``)."""


@dataclass
class LossTerms:
    """The loss terms of one micro-batch, kept (detached, on device) until its optimizer step is checked."""

    step: int
    micro_step: int
    terms: list[tuple[str, torch.Tensor, Subnet | None]]
    labels: torch.Tensor | None = None


class _NonFiniteLossGuard(TrainerCallback):
    """Checks the loss terms of each optimizer step once, just before the optimizer step."""

    def __init__(self, trainer: ReliableTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, D102
        self.trainer._restore_skip_count()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001, D102
        self.trainer._check_step_is_finite()


class ReliableTrainer(Trainer):
    """``Trainer`` with crash-safe checkpoints, exact resume and a guard against non-finite losses.

    - Checkpoints are written into a staging directory and renamed to ``checkpoint-N`` once
      complete (with a manifest of their files), and never contain a pickle of the arguments:
      ``training_args.json`` replaces ``training_args.bin``.
    - ``train(resume_from_checkpoint=True)`` resumes from the last *complete* checkpoint, and a
      checkpoint path is checked (files, weight shapes) before anything is loaded.
    - Training batches are fetched through :class:`~stim_hf.checkpointing.SeededBatchDataset`, so
      random augmentation is the same after a resume as in an uninterrupted run.
    - Each optimizer step's loss terms (recorded by subclasses with :meth:`note_loss_terms`) are
      checked once for NaN / inf before the optimizer step: ``on_nonfinite_loss: stop`` saves a
      debugging dump and raises :class:`NonFiniteLossError`; ``skip`` drops the step's update.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._checkpoint_staging_dir: str | None = None
        self._loss_records: deque[LossTerms] = deque(maxlen=4096)
        self._log_state_at_step_start: Any = None
        self.nonfinite_skipped_steps = 0
        self.add_callback(_NonFiniteLossGuard(self))

    # -- hooks for subclasses -------------------------------------------------------------------

    def _log_accumulators(self) -> Any:
        """Snapshot of the subclass's logging accumulators (restored when a step is skipped)."""
        return None

    def _restore_log_accumulators(self, saved: Any) -> None:
        """Restore what :meth:`_log_accumulators` returned."""

    def note_loss_terms(
        self,
        step: int,
        micro_step: int,
        terms: list[tuple[str, torch.Tensor, Subnet | None]],
        labels: torch.Tensor | None = None,
    ) -> None:
        """Record one micro-batch's loss terms ``(name, scalar, sub-network or None)`` for the finiteness check.

        No host-device synchronisation: the tensors are detached and checked together, once
        per optimizer step, by :meth:`_check_step_is_finite`.
        """
        if not self._loss_records:
            self._log_state_at_step_start = self._log_accumulators()
        detached = [(name, value.detach(), subnet) for name, value, subnet in terms]
        self._loss_records.append(LossTerms(step, micro_step, detached, None if labels is None else labels.detach()))

    # -- non-finite losses ----------------------------------------------------------------------

    def _check_step_is_finite(self) -> None:
        """Check the recorded loss terms of this optimizer step: one sync (and one all-reduce if distributed)."""
        records = list(self._loss_records)
        self._loss_records.clear()
        values = [value.float().reshape(()) for record in records for _, value, _ in record.terms]
        device = self.args.device
        bad = (~torch.isfinite(torch.stack(values))).sum().float() if values else torch.zeros((), device=device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad.to(device), reduction="sum")
        if bad.item() == 0:
            return
        step = self.state.global_step + 1
        description = describe_nonfinite_terms(records, step, self.state.epoch)
        if self.args.on_nonfinite_loss == "skip":
            self._skip_step_update()
            self._restore_log_accumulators(self._log_state_at_step_start)
            self.nonfinite_skipped_steps += 1
            logger.warning(
                "%s; skipped this step's update (on_nonfinite_loss=skip, %d skipped so far)",
                description,
                self.nonfinite_skipped_steps,
            )
            return
        directory = self._dump_nonfinite_step(records, description, step)
        raise NonFiniteLossError(
            f"{description}; training stopped before the update, and the model weights, the batch labels and "
            f"a report are in '{directory}'. Check the inputs for inf/NaN, lower the learning rate or the KL "
            "temperature, or set on_nonfinite_loss: skip to drop such steps"
        )

    def _skip_step_update(self) -> None:
        """Make the coming optimizer step leave the parameters and the optimizer state unchanged."""
        model = self.accelerator.unwrap_model(self.model)
        if getattr(self.accelerator, "scaler", None) is not None:
            # fp16 GradScaler: non-finite gradients make it skip the step (and lower the scale).
            for parameter in model.parameters():
                if parameter.grad is not None:
                    parameter.grad.fill_(float("nan"))
        else:
            # Optimizers skip parameters without a gradient: no update, no momentum / Adam step.
            model.zero_grad(set_to_none=True)

    def _restore_skip_count(self) -> None:
        counts = [entry.get("nonfinite_skipped_steps", 0) for entry in self.state.log_history]
        self.nonfinite_skipped_steps = int(max(counts, default=self.nonfinite_skipped_steps))

    def _dump_nonfinite_step(self, records: list[LossTerms], description: str, step: int) -> str:
        directory = os.path.join(self.args.output_dir, f"{NONFINITE_PREFIX}{step}")
        suffix = f"-rank{self.args.process_index}" if self.args.world_size > 1 else ""
        report = {
            "message": description,
            "global_step": step,
            "epoch": self.state.epoch,
            "process_index": self.args.process_index,
            "learning_rate": self._get_learning_rate() if self.lr_scheduler is not None else None,
            "terms": [
                {
                    "micro_batch": record.micro_step,
                    "term": name,
                    "value": float(value),
                    "subnet": None if subnet is None else _subnet_dict(subnet),
                }
                for record in records
                for name, value, subnet in record.terms
            ],
        }
        labels = {f"labels_micro_batch_{r.micro_step}": r.labels for r in records if r.labels is not None}
        try:
            write_nonfinite_report(directory, report, labels, name_suffix=suffix)
            if self.args.should_save:
                self._save(directory)
        except Exception as error:  # the stop message matters more than the dump
            logger.error("could not write the non-finite step dump to %s: %s", directory, error)
        return directory

    # -- checkpoints ----------------------------------------------------------------------------

    def _get_output_dir(self, trial: Any) -> str:
        # While a checkpoint is written, the Trainer's run directory is the staging directory.
        if self._checkpoint_staging_dir is not None:
            return self._checkpoint_staging_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write ``checkpoint-N`` atomically: into a staging directory, then one rename.

        Every process writes its files (model, optimizer, scheduler, RNG states, trainer state)
        into ``.staging-checkpoint-N/checkpoint-N``; after a barrier the saving process writes the
        manifest and renames the folder to ``checkpoint-N``, then rotates old checkpoints. With
        ``push_to_hub`` (which uploads from the folder in the background) the Trainer's own
        non-atomic save is used.
        """
        if self.args.push_to_hub:
            return super()._save_checkpoint(model, trial)
        run_dir = super()._get_output_dir(trial)
        step = self.state.global_step
        name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
        staging = staging_dir(run_dir, step)
        if self.args.should_save:
            remove_stale_staging(run_dir)
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging_dir = None
        staged, final = os.path.join(staging, name), os.path.join(run_dir, name)
        best = self.state.best_model_checkpoint
        if best is not None and os.path.abspath(best).startswith(os.path.abspath(staging) + os.sep):
            # The Trainer pointed the best checkpoint into the staging directory: point it at the final one.
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            write_manifest(staged, step)
            publish_checkpoint(staged, final)
            logger.info("saved checkpoint %s", final)
            rotate_checkpoints(run_dir, self.args.save_total_limit, keep=(final, self.state.best_model_checkpoint))
        self.accelerator.wait_for_everyone()
        if os.path.isdir(staged):  # this process's files on a filesystem the saving process does not see
            merge_local_files(staged, final)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """``Trainer._save`` without ``training_args.bin``: the arguments go to ``training_args.json``.

        ``training_args.bin`` is a pickle, and loading a pickle runs arbitrary code; nothing here
        writes or reads one. Model weights are safetensors (``save_pretrained``).
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save and not getattr(self, "is_distributed_loading_by_transformers", False):
            return
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            logger.info("saving model to %s", output_dir)
        unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if isinstance(unwrapped, _SAVE_PRETRAINED_CLASSES):
            unwrapped.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        elif self.args.should_save:
            logger.info("the model is not a PreTrainedModel: saving its state dict only")
            safetensors.torch.save_file(
                self.model.state_dict() if state_dict is None else state_dict,
                os.path.join(output_dir, SAFE_WEIGHTS_NAME),
                metadata={"format": "pt"},
            )
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        with open(os.path.join(output_dir, TRAINING_ARGS_JSON_NAME), "w", encoding="utf-8") as handle:
            handle.write(self.args.to_json_string())

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ):
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the last *complete* checkpoint.

        A checkpoint (given or found) is checked before anything is loaded: its files must be
        complete and its weights must fit the model, else :class:`~stim_hf.errors.ConfigError`.
        """
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            check_checkpoint_matches_model(checkpoint, self.accelerator.unwrap_model(self.model))
        return super().train(
            resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )

    def get_train_dataloader(self) -> DataLoader:
        """``Trainer.get_train_dataloader`` over a :class:`SeededBatchDataset` (exact augmentation on resume)."""
        dataset = self.train_dataset
        if dataset is None or isinstance(dataset, (IterableDataset, SeededBatchDataset)) or not has_length(dataset):
            return super().get_train_dataloader()
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self.train_dataset = SeededBatchDataset(dataset, seed)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset = dataset

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``nonfinite_skipped_steps`` (cumulative) to training logs once a step was skipped."""
        if "loss" in logs and self.nonfinite_skipped_steps:
            logs["nonfinite_skipped_steps"] = float(self.nonfinite_skipped_steps)
        super().log(logs, start_time)


def describe_nonfinite_terms(records: list[LossTerms], step: int, epoch: float | None) -> str:
    """One sentence naming the step and every non-finite loss term (CE, or KL with its sub-network)."""
    where = f"training step {step}" + (f" (epoch {epoch:.2f})" if epoch is not None else "")
    found = []
    for record in records:
        for name, value, subnet in record.terms:
            number = float(value)
            if math.isfinite(number):
                continue
            if subnet is None:
                what = "the full network's cross-entropy (ce_loss)"
            else:
                what = f"the KL loss of sub-network {name.rsplit('_', 1)[-1]} ({subnet.describe()})"
            found.append(f"{what} is {number} in micro-batch {record.micro_step}")
    if not found:
        return f"non-finite loss at {where} on another process"
    return f"non-finite loss at {where}: " + "; ".join(found)


def _subnet_dict(subnet: Subnet) -> dict[str, Any]:
    return {
        "depths": list(subnet.depths),
        "kept": [list(k) for k in subnet.kept],
        "num_blocks": list(subnet.num_blocks),
        "input_size": subnet.input_size,
        "description": subnet.describe(),
    }


class StimulativeTrainer(ReliableTrainer):
    """A ``transformers.Trainer`` that trains a residual network stimulatively (ST / ST++).

    Each training step computes the full network's cross-entropy and, for ``num_subnets``
    sub-networks sampled from ``(seed, step)``, a KL loss from the detached full network's logits
    to the sub-network's (each on its own randomly down-scaled copy of the batch); one backward
    of the sum. Evaluation and prediction run the full network only. Use it like ``Trainer``,
    with :class:`~stim_hf.config.StimulativeTrainingArguments` as ``args``.
    """

    # compute_loss returns a per-micro-batch mean: the Trainer must divide it by the number of
    # gradient accumulation steps (DESIGN.md 3: it guesses wrong for models taking **kwargs).
    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module | None = None, args: StimulativeTrainingArguments | None = None, **kwargs):
        if args is None:
            args = StimulativeTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, StimulativeTrainingArguments):
            raise ConfigError(
                f"StimulativeTrainer needs StimulativeTrainingArguments, got {type(args).__name__}; "
                "build them with StimulativeTrainingArguments(output_dir=..., stim_method=...)"
            )
        model = prepare_model(model, args) if model is not None else None
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.family, self.stages = None, None
        try:
            self.family, self.stages = find_residual_family(self.model)
        except ModelStructureError:
            if args.uses_subnets:
                raise
            logger.info("no residual stages found: sub-network evaluation is disabled for this model")
        self.subnet_sampler = self._build_sampler(args.seed, args.min_input_scale) if self.stages else None
        self._stim_sums: dict[str, Any] = {}
        self._stim_count = 0
        self._micro_step_key = (-1, 0)  # (global step, micro-batches seen in it)
        self._bn_recalibrated_at: int | None = None
        self._subnet_backward_scale: float | None = None
        # (global step, depth fraction, input side) of every sub-network drawn since the last
        # drain; read by monitoring callbacks (histograms), bounded so it never grows unread.
        self.sampled_subnets: deque[tuple[int, float, int]] = deque(maxlen=100_000)
        if args.subnet_monitor_count and self.stages:
            from stim_hf.callbacks import SubnetMonitorCallback

            self.add_callback(SubnetMonitorCallback(self))

    def _build_sampler(self, seed: int, min_input_scale: float, stream: int = 0) -> SubnetSampler:
        if min_input_scale < 1.0 and not self.family.supports_smaller_inputs:
            raise ConfigError(
                f"min_input_scale={min_input_scale}: {type(self.model).__name__} ({self.family.name}) cannot run "
                "on inputs smaller than its training size; set min_input_scale: 1.0 (depth sampling only)"
            )
        sampler = SubnetSampler(
            self.stages,
            rule=self.args.subnet_sampling,
            sample_space=self.args.sample_space,
            min_input_scale=min_input_scale,
            seed=seed,
            min_input_size=max(
                MIN_SUBNET_INPUT_SIZE,
                self.family.min_input_size(self.model) if self.family.min_input_size else 0,
            ),
            stream=stream,
        )
        if stream == 0 and self.args.uses_subnets and not any(sampler.space) and min_input_scale >= 1.0:
            raise ConfigError(
                f"sample_space={self.args.sample_space!r} lets sampling drop no block of "
                f"{type(self.model).__name__} (at most {[s.max_droppable(self.args.subnet_sampling) for s in self.stages]} "
                "per stage: a stage keeps its first block and blocks that change shape), and min_input_scale=1.0 keeps "
                "the full input size, so every sub-network would be the full network; use a deeper model, a larger "
                "sample_space, min_input_scale < 1, or stim_method: ct"
            )
        return sampler

    # ----------------------------------------------------------------------------------------------
    # Loss
    # ----------------------------------------------------------------------------------------------

    def current_kl_coef(self) -> float:
        """lambda at the current step: 0 before ``stim_start_epoch``, then the configured schedule."""
        args = self.args
        epoch = self.state.epoch or 0.0
        if not args.uses_subnets or self.subnet_sampler is None or epoch < args.stim_start_epoch:
            return 0.0
        total = self.state.num_train_epochs or 0
        span = total - args.stim_start_epoch
        progress = (epoch - args.stim_start_epoch) / span if span > 0 else 1.0
        return kl_coef_at(args.kl_coef, args.kl_coef_schedule, progress)

    def _next_micro_step(self) -> tuple[int, int]:
        step, seen = self._micro_step_key
        if step != self.state.global_step:
            step, seen = self.state.global_step, 0
        self._micro_step_key = (step, seen + 1)
        return step, seen

    def main_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the full network (in float32), on normalised logits if configured."""
        args = self.args
        logits = (
            normalize_logits(logits, args.logit_normalization, args.logit_amplitude)
            if args.normalize_main_logits
            else logits.float()
        )
        return F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing_factor)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Full-network CE plus ``kl_coef(t) * sum_k KL(full || subnet_k)`` in training mode.

        Outside training (evaluation, prediction) only the full network runs and its outputs
        are returned, so predictions come from the full network alone.
        """
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        if self.args.channels_last and pixel_values.dim() == 4:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        outputs = model(pixel_values=pixel_values)
        logits = outputs.logits
        ce = self.main_loss(logits, labels)
        if not model.training:
            return (ce, outputs) if return_outputs else ce

        step, micro_step = self._next_micro_step()
        coef = self.current_kl_coef()
        loss = ce
        terms: list[tuple[str, torch.Tensor, Subnet | None]] = [("ce_loss", ce, None)]
        kl_sum = ce.new_zeros(())
        depth_sum = size_sum = 0.0
        num_subnets = self.args.num_subnets if coef > 0 else 0
        for index in range(num_subnets):
            subnet = self.subnet_sampler.sample(step, micro_step, index, image_size=pixel_values.shape[-2])
            kl = self.subnet_kl(model, pixel_values, logits, subnet)
            if self._subnet_backward_scale is not None:
                # Sequential strategy: free this sub-network's graph now; the CE's backward follows.
                self.accelerator.backward(coef * self._subnet_backward_scale * kl)
                kl = kl.detach()
            kl_sum = kl_sum + kl
            terms.append((f"kl_loss_{index}", kl, subnet))
            size = subnet.input_size or pixel_values.shape[-2]
            depth_sum += subnet.depth_fraction
            size_sum += size
            self.sampled_subnets.append((step, subnet.depth_fraction, size))
        if num_subnets:
            loss = loss + coef * kl_sum
        self.note_loss_terms(step, micro_step, terms, labels)
        self._record(ce, kl_sum / max(num_subnets, 1), coef, depth_sum, size_sum, num_subnets)
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """``Trainer.training_step``; with ``backward_strategy='sequential'``, one backward per loss term.

        Each sub-network's KL is back-propagated right after its forward (``compute_loss``), then
        the CE through the Trainer as usual, so at most one sub-network's activations are alive.
        Under DDP all of these backwards run without gradient synchronisation (a sub-network's
        backward does not reach every parameter), and the gradients are averaged across processes
        once, on the micro-batch that ends the optimizer step.
        """
        if self.args.backward_strategy != "sequential" or not self.args.uses_subnets:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ConfigError("backward_strategy='sequential' supports DDP only; use 'summed' with FSDP or DeepSpeed")
        distributed = self.accelerator.num_processes > 1 and model is not self.accelerator.unwrap_model(model)
        self._subnet_backward_scale = 1.0 / self.current_gradient_accumulation_steps
        try:
            with self.accelerator.no_sync(model) if distributed else nullcontext():
                loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._subnet_backward_scale = None
        if distributed and self.accelerator.sync_gradients:
            average_gradients(model)
        return loss

    def subnet_kl(
        self, model: nn.Module, pixel_values: torch.Tensor, teacher_logits: torch.Tensor, subnet: Subnet
    ) -> torch.Tensor:
        """Run ``subnet`` on its (resized) copy of the batch and return its KL to the teacher."""
        args = self.args
        resized = resize_for_subnet(pixel_values, subnet)
        forward_kwargs = self.family.resized_forward_kwargs if resized is not pixel_values else {}
        pixel_values = resized
        bn_context = frozen_running_stats(model) if args.bn_policy == "main_only" else nullcontext()
        with use_subnet(self.stages, subnet), bn_context:
            student_logits = model(pixel_values=pixel_values, **forward_kwargs).logits
        return distillation_loss(
            args.kl_loss,
            teacher_logits.detach(),
            student_logits,
            temperature=args.kl_temperature,
            amplitude=args.logit_amplitude,
            normalization=args.logit_normalization,
        )

    # ----------------------------------------------------------------------------------------------
    # Logging
    # ----------------------------------------------------------------------------------------------

    def _log_accumulators(self) -> Any:
        return dict(self._stim_sums), self._stim_count

    def _restore_log_accumulators(self, saved: Any) -> None:
        if saved is not None:
            self._stim_sums, self._stim_count = saved

    def _record(
        self,
        ce: torch.Tensor,
        kl: torch.Tensor,
        coef: float,
        depth_sum: float,
        size_sum: float,
        num_subnets: int,
    ) -> None:
        # Device tensors are summed without .item(): no host-device sync inside the step.
        sums = self._stim_sums
        sums["ce_loss"] = sums.get("ce_loss", 0.0) + ce.detach()
        sums["kl_loss"] = sums.get("kl_loss", 0.0) + kl.detach()
        sums["kl_coef"] = sums.get("kl_coef", 0.0) + coef
        sums["subnet_depth_fraction"] = sums.get("subnet_depth_fraction", 0.0) + depth_sum
        sums["subnet_input_size"] = sums.get("subnet_input_size", 0.0) + size_sum
        sums["subnets"] = sums.get("subnets", 0) + num_subnets
        self._stim_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the stimulative scalars (means since the last log, across processes) to training logs."""
        if "loss" in logs and self._stim_count:
            sums = self._stim_sums
            device = self.args.device
            values = torch.stack(
                [torch.as_tensor(sums[k], dtype=torch.float32, device=device) for k in _LOG_KEYS]
                + [
                    torch.tensor(float(sums["subnets"]), device=device),
                    torch.tensor(float(self._stim_count), device=device),
                ]
            )
            values = self.accelerator.reduce(values, reduction="sum") if self.accelerator.num_processes > 1 else values
            values = values.tolist()
            steps, subnets = values[-1], values[-2]
            logs["ce_loss"] = values[0] / steps
            logs["kl_loss"] = values[1] / steps
            logs["kl_coef"] = values[2] / steps
            if subnets:
                logs["subnet_depth_fraction"] = values[3] / subnets
                logs["subnet_input_size"] = values[4] / subnets
            self._stim_sums, self._stim_count = {}, 0
        super().log(logs, start_time)

    # ----------------------------------------------------------------------------------------------
    # BatchNorm recalibration
    # ----------------------------------------------------------------------------------------------

    def recalibrate_bn(self, num_samples: int | None = None) -> int:
        """Re-estimate the full network's BatchNorm statistics on training images.

        Uses ``num_samples`` (default ``bn_recalibration_samples``) images drawn with a seed that
        depends on the step, split across processes, and averages the result across processes.
        Random states are restored afterwards so training continues unchanged.
        """
        if self.train_dataset is None:
            raise ConfigError("bn_policy='recalibrate' needs a train_dataset to re-estimate BatchNorm statistics")
        num_samples = num_samples or self.args.bn_recalibration_samples
        model = self.accelerator.unwrap_model(self.model)
        with preserved_rng_state():
            order = np.random.default_rng([self.args.seed, self.state.global_step]).permutation(len(self.train_dataset))
            chosen = order[:num_samples]
            shard = chosen[self.args.process_index :: self.args.world_size].tolist()
            loader = DataLoader(
                Subset(self.train_dataset, shard),
                batch_size=self.args.per_device_train_batch_size,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
            )
            batches = (self._prepare_inputs(batch) for batch in loader)
            with self.compute_loss_context_manager():
                seen = recalibrate_batchnorm(
                    model,
                    batches,
                    len(shard),
                    all_reduce_mean=lambda t: self.accelerator.reduce(t, reduction="mean"),
                )
        self._bn_recalibrated_at = self.state.global_step
        logger.info("re-estimated BatchNorm statistics on %d images at step %d", seen, self.state.global_step)
        return seen

    def _maybe_recalibrate_bn(self) -> None:
        if self.args.bn_policy == "recalibrate" and self._bn_recalibrated_at != self.state.global_step:
            self.recalibrate_bn()

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """``Trainer.evaluate`` after BatchNorm recalibration when ``bn_policy='recalibrate'``."""
        self._maybe_recalibrate_bn()
        return super().evaluate(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` after BatchNorm recalibration when ``bn_policy='recalibrate'``."""
        self._maybe_recalibrate_bn()
        super().save_model(output_dir, _internal_call)

    # ----------------------------------------------------------------------------------------------
    # Sub-network evaluation
    # ----------------------------------------------------------------------------------------------

    def fixed_subnets(self, num_subnets: int, seed: int | None = None) -> list[Subnet]:
        """``num_subnets`` distinct sub-networks (never the full one) from the training sampling rule.

        The same seed gives the same sub-networks for any checkpoint of the same architecture,
        which makes runs (CT against ST++, epochs of one run) comparable.
        """
        if self.stages is None:
            return []
        sampler = self._build_sampler(self.args.seed if seed is None else seed, 1.0, stream=EVAL_SUBNET_STREAM)
        return sampler.distinct_subnets(num_subnets)

    def evaluate_subnets(
        self,
        eval_dataset: Dataset | None = None,
        subnets: list[Subnet] | None = None,
        num_subnets: int | None = None,
    ) -> list[dict[str, Any]]:
        """Evaluate sub-networks at full resolution with the full network's BatchNorm statistics.

        Returns one dict per sub-network: its depths, kept blocks, depth fraction and metrics
        (``accuracy``, ``top5_accuracy``, ``loss``). This measures "loafing": how well the
        sub-networks work on their own.
        """
        if subnets is None:
            subnets = self.fixed_subnets(self.args.num_eval_subnets if num_subnets is None else num_subnets)
        eval_dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        results = []
        for subnet in subnets:
            with use_subnet(self.stages, subnet):
                output = self.predict(eval_dataset, metric_key_prefix="subnet")
            metrics = {k.removeprefix("subnet_"): v for k, v in output.metrics.items()}
            results.append(
                {
                    "depths": list(subnet.depths),
                    "kept": [list(k) for k in subnet.kept],
                    "depth_fraction": subnet.depth_fraction,
                    **{k: v for k, v in metrics.items() if k in ("accuracy", "top5_accuracy", "loss")},
                }
            )
        return results

"""A ``Trainer`` that never loses a checkpoint, resumes exactly and refuses non-finite losses.

The reliability half of :class:`~stim_hf.training.trainer.StimulativeTrainer`, kept apart from the method.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import pickle
import shutil
from collections import deque
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length
from transformers.training_args import OptimizerNames
from transformers.utils import SAFE_WEIGHTS_NAME, is_peft_available

from stim_hf.errors import ConfigError, StimError
from stim_hf.method import (
    Subnet,
)
from stim_hf.training.checkpointing import (
    MODEL_STAGING_NAME,
    NONFINITE_PREFIX,
    TRAINER_STATE_NAME,
    TRAINING_ARGS_JSON_NAME,
    SeededBatchDataset,
    changed_training_arguments,
    check_checkpoint_matches_model,
    checkpoint_global_step,
    checkpoint_size,
    describe_changes,
    describe_last_complete,
    merge_local_files,
    publish_checkpoint,
    publish_files,
    remove_stale_staging,
    resolve_resume_checkpoint,
    rotate_checkpoints,
    staging_dir,
    state_load_error,
    write_manifest,
    write_nonfinite_report,
)
from stim_hf.training.integrity import damage_remedy, folder_problems, write_folder_manifest
from stim_hf.training.modeling import without_transformers_progress_bars
from stim_hf.training.write_failures import reported_write_failures

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_SKIPPED_STEPS = 20
"""``on_nonfinite_loss: skip`` stops the run after this many non-finite steps in a row: it has diverged."""
# What torch.load, an optimizer's load_state_dict or the RNG setters raise on a state they cannot take.
_STATE_LOAD_ERRORS = (pickle.UnpicklingError, KeyError, ValueError, RuntimeError, TypeError, IndexError, EOFError)

# Models saved with save_pretrained (safetensors); anything else is saved as a safetensors state dict.
_SAVE_PRETRAINED_CLASSES: tuple[type, ...] = (PreTrainedModel,)
if is_peft_available():
    from peft import PeftModel

    _SAVE_PRETRAINED_CLASSES += (PeftModel,)


class NonFiniteLossError(StimError, FloatingPointError):
    """A training step produced a NaN or infinite loss (``on_nonfinite_loss: stop``)."""


class HostScalar:
    """A device scalar on its way to the host: the copy is queued at once, :meth:`get` waits for it alone.

    On a CUDA device ``.item()`` waits for every kernel queued so far: asked just before the
    optimizer step, that is the whole backward, and the GPU then idles while the host prepares
    the next step. The copy here goes to pinned memory behind the kernels that computed the
    scalar, and an event recorded after it lets :meth:`get` wait for those kernels only. On other
    devices :meth:`get` reads the tensor as usual.
    """

    def __init__(self, value: torch.Tensor) -> None:
        self._event = None
        if value.device.type == "cuda":
            value = value.to("cpu", non_blocking=True)  # lands in pinned memory
            self._event = torch.cuda.Event()
            self._event.record()
        self._value = value

    def get(self) -> float:
        """The value, once the kernels that computed it have run."""
        if self._event is not None:
            self._event.synchronize()
        return self._value.item()


@dataclass
class LossTerms:
    """The loss terms of one micro-batch, kept (detached, on device) until its optimizer step is checked.

    ``nonfinite`` counts the non-finite terms (summed over processes), on its way to the host.
    """

    step: int
    micro_step: int
    terms: list[tuple[str, torch.Tensor, Subnet | None]]
    nonfinite: HostScalar
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
    - Training batches are fetched through :class:`~stim_hf.training.checkpointing.SeededBatchDataset`, so
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
        self._tr_loss_at_step_start: torch.Tensor | None = None
        self.nonfinite_skipped_steps = 0
        self._consecutive_skipped_steps = 0
        self._resume_changes: dict[str, tuple[Any, Any]] = {}
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

        No host-device synchronisation: the count of non-finite terms is computed right after the
        forward (all-reduced with several processes, so every process decides alike) and copied
        to the host without waiting; :meth:`_check_step_is_finite` reads the counts before the
        optimizer step, waiting for the forwards that produced them but not for the backward.
        Call it on every process for every training micro-batch (the all-reduce is collective).
        """
        if not self._loss_records:
            self._log_state_at_step_start = self._log_accumulators()
            if self.args.on_nonfinite_loss == "skip" and not self.args.logging_nan_inf_filter:
                tr_loss = getattr(self, "_tr_loss", None)
                self._tr_loss_at_step_start = tr_loss.clone() if isinstance(tr_loss, torch.Tensor) else None
        detached = [(name, value.detach(), subnet) for name, value, subnet in terms]
        values = [value.float().reshape(()) for _, value, _ in detached]
        bad = (~torch.isfinite(torch.stack(values))).sum() if values else torch.zeros((), dtype=torch.long)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad.to(self.args.device), reduction="sum")
        labels = None if labels is None else labels.detach()
        self._loss_records.append(LossTerms(step, micro_step, detached, HostScalar(bad), labels))

    # -- non-finite losses ----------------------------------------------------------------------

    def _check_step_is_finite(self) -> None:
        """Check the recorded loss terms of this optimizer step, without waiting for its backward."""
        records = list(self._loss_records)
        self._loss_records.clear()
        if sum(record.nonfinite.get() for record in records) == 0:
            self._consecutive_skipped_steps = 0
            return
        step = self.state.global_step + 1
        description = describe_nonfinite_terms(records, step, self.state.epoch)
        skip = self.args.on_nonfinite_loss == "skip"
        if skip and self._consecutive_skipped_steps + 1 >= MAX_CONSECUTIVE_SKIPPED_STEPS:
            description = (
                f"{description}; that is {MAX_CONSECUTIVE_SKIPPED_STEPS} non-finite steps in a row, so the run has "
                "diverged and skipping cannot save it"
            )
        elif skip:
            self._skip_step_update()
            self._restore_log_accumulators(self._log_state_at_step_start)
            self._replace_skipped_step_loss()
            self.nonfinite_skipped_steps += 1
            self._consecutive_skipped_steps += 1
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
            "temperature" + ("" if skip else ", or set on_nonfinite_loss: skip to drop such steps")
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

    def _replace_skipped_step_loss(self) -> None:
        """Count the skipped step in the logged ``loss`` at the interval's mean, as ``logging_nan_inf_filter`` would.

        That filter is off by default here (its check waits for every step's backward); the loss
        accumulated before the step was kept by :meth:`note_loss_terms`.
        """
        before = self._tr_loss_at_step_start
        if before is None or not isinstance(getattr(self, "_tr_loss", None), torch.Tensor):
            return
        self._tr_loss = before + before / (1 + self.state.global_step - self._globalstep_last_logged)
        self._tr_loss_at_step_start = None

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
        manifest (sizes and hashes) and renames the folder to ``checkpoint-N``, then rotates old
        checkpoints. A write that fails (no space, a quota, a read-only or vanished folder) removes
        the staging folder and raises :class:`~stim_hf.errors.StorageError` naming the cause and the
        last complete checkpoint; nothing is rotated away before its successor is published. With
        ``push_to_hub`` (which uploads from the folder in the background) the Trainer's own
        non-atomic save is used.
        """
        if self.args.push_to_hub:
            return super()._save_checkpoint(model, trial)
        run_dir = super()._get_output_dir(trial)
        step = self.state.global_step
        name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
        staging = staging_dir(run_dir, step)
        staged, final = os.path.join(staging, name), os.path.join(run_dir, name)
        if self.args.should_save:
            remove_stale_staging(run_dir)
        self.accelerator.wait_for_everyone()
        with reported_write_failures(
            name,
            run_dir,
            partial=(staging,),
            intact=lambda: describe_last_complete(run_dir),
            needed=lambda: checkpoint_size(run_dir),
        ):
            os.makedirs(staged, exist_ok=True)
            self._checkpoint_staging_dir = staging
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._checkpoint_staging_dir = None
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
        if self.args.should_save:
            logger.info("saved checkpoint %s", final)
            rotate_checkpoints(
                run_dir, self.args.save_total_limit, keep=(final, self.state.best_model_checkpoint), current_step=step
            )
        self.accelerator.wait_for_everyone()
        if os.path.isdir(staged):  # this process's files on a filesystem the saving process does not see
            merge_local_files(staged, final)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """``Trainer._save`` without ``training_args.bin``, and never a half-written model file.

        ``training_args.bin`` is a pickle, and loading a pickle runs arbitrary code; nothing here
        writes or reads one: the arguments go to ``training_args.json``, the weights are safetensors
        (``save_pretrained``). Outside a checkpoint (which is staged as a whole), the files are
        written into ``output_dir/.staging-model`` first and then each replaces its namesake in
        ``output_dir`` with one rename, the manifest (``stim_hf_manifest.json``: each file's size and
        hash) last: a crash while saving leaves the previous model intact, and a failed write
        removes the staging folder and raises :class:`~stim_hf.errors.StorageError` naming the cause.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        distributed_write = getattr(self, "is_distributed_loading_by_transformers", False)
        if self._checkpoint_staging_dir is not None or distributed_write or not self.args.should_save:
            return self._write_model(output_dir, state_dict)
        staging = os.path.join(output_dir, MODEL_STAGING_NAME)
        shutil.rmtree(staging, ignore_errors=True)
        run_dir = self.args.output_dir

        def intact() -> str:
            return f"'{output_dir}' keeps the files of its previous save, if any; {describe_last_complete(run_dir)}"

        with reported_write_failures("the model", output_dir, partial=(staging,), intact=intact):
            os.makedirs(staging)
            self._write_model(staging, state_dict)
            write_folder_manifest(staging)
            publish_files(staging, output_dir)

    def _write_model(self, output_dir: str, state_dict: dict | None) -> None:
        """Write the model (safetensors), the processor and ``training_args.json`` into ``output_dir``."""
        if not self.args.should_save and not getattr(self, "is_distributed_loading_by_transformers", False):
            return
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            logger.info("saving model to %s", output_dir)
        unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if isinstance(unwrapped, _SAVE_PRETRAINED_CLASSES):
            with without_transformers_progress_bars():
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
        self._resume_changes = {}
        if checkpoint is not None:
            self._check_resume(checkpoint)
        return super().train(
            resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )

    def _check_resume(self, checkpoint: str) -> None:
        """Refuse a checkpoint that does not fit the model or has nothing left to train; warn about changed settings."""
        check_checkpoint_matches_model(checkpoint, self.accelerator.unwrap_model(self.model))
        step = checkpoint_global_step(checkpoint)
        if step is not None and 0 < self.args.max_steps <= step:
            raise ConfigError(
                f"checkpoint '{checkpoint}' is at step {step} and max_steps is {self.args.max_steps}: that run is "
                "finished; raise max_steps to train on from it"
            )
        self._resume_changes = changed_training_arguments(checkpoint, json.loads(self.args.to_json_string()))
        before, after = self._resume_changes.get("optim", (None, None))
        if before is not None and self._optimizer_class(before) is not self._optimizer_class(after):
            # The optimizer would take the other one's parameter groups and fail at its first step.
            raise ConfigError(
                f"checkpoint '{checkpoint}' holds the state of optim={before!r}, and this run has optim={after!r}, "
                f"an optimizer that cannot take it; resume with optim: {before}, or start a new run without "
                "resume_from_checkpoint (model_name_or_path starts one from its weights)"
            )
        if self._resume_changes:
            logger.warning(
                "resuming from %s with settings it was not trained with (%s): the run goes on from its state, "
                "but it is not the exact continuation of the run that wrote it",
                checkpoint,
                describe_changes(self._resume_changes),
            )

    def _optimizer_class(self, optim: Any) -> type | None:
        """The optimizer class the Trainer builds for ``optim`` under this run's arguments (None: unknown)."""
        probe = copy.copy(self.args)
        try:
            probe.optim = OptimizerNames(optim)
            return self.get_optimizer_cls_and_kwargs(probe)[0]
        except Exception:  # an unknown name, or an optimizer whose package is not installed
            return None

    def _load_best_model(self) -> None:
        """``Trainer._load_best_model`` once the best checkpoint's model is as written (sizes, hashes); else ConfigError."""
        best = self.state.best_model_checkpoint
        problems = folder_problems(best) if best is not None and os.path.isdir(best) else []  # what the load reads
        if problems:
            raise ConfigError(
                f"the best checkpoint '{best}' (load_best_model_at_end) is not as it was written: "
                f"{'; '.join(problems)}; {damage_remedy(best)}, or resume from another checkpoint"
            )
        super()._load_best_model()

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """``Trainer._load_optimizer_and_scheduler``; a state that cannot be loaded is a ConfigError naming the fix."""
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except _STATE_LOAD_ERRORS as error:
            raise state_load_error(checkpoint, "optimizer and scheduler", error, self._resume_changes) from error

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """``Trainer._load_rng_state``; a state that cannot be loaded is a ConfigError naming the fix."""
        try:
            super()._load_rng_state(checkpoint)
        except _STATE_LOAD_ERRORS as error:
            raise state_load_error(checkpoint, "random number generator", error, self._resume_changes) from error

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
            if subnet is None and name == "ce_loss":
                what = "the full network's cross-entropy (ce_loss)"
            elif subnet is None:
                what = f"the loss term {name}"
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

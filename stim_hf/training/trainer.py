"""The stimulative ``Trainer``: full-network cross-entropy plus KL towards sampled sub-networks.

This module holds the training step: the loss (:meth:`StimulativeTrainer.compute_loss`, lambda's
schedule), the backward strategies, the logged scalars and the Trainer's per-step bookkeeping made
cheap. Beside it: :mod:`~stim_hf.training.model_setup` (fitting the method to a model, before any data
is loaded) and :mod:`~stim_hf.training.subnet_evaluation` (BatchNorm estimation and sub-network
scoring); the crash-safety half is :mod:`~stim_hf.training.reliable_trainer`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader

from stim_hf.errors import ConfigError
from stim_hf.method import (
    Subnet,
    SubnetSampler,
    resize_for_subnet,
    resize_input,
    use_subnet,
    zero_init_residual_branches,
)
from stim_hf.method.batchnorm import frozen_running_stats
from stim_hf.method.losses import distillation_loss, normalize_logits
from stim_hf.training.callbacks import SubnetMonitorCallback
from stim_hf.training.collapse import CollapseMonitorCallback
from stim_hf.training.config import StimulativeTrainingArguments
from stim_hf.training.model_setup import (
    MIN_SUBNET_INPUT_SIZE,  # noqa: F401  (re-exported: where it was)
    build_subnet_sampler,
    check_zero_init_residual,  # noqa: F401  (re-exported: where it was)
    full_input_sampler,
    method_structures,
    prepare_model,
    refuse_zero_init_of_pretrained,  # noqa: F401  (re-exported: where it was)
)
from stim_hf.training.model_walks import (
    ModelWalks,
    fast_zero_grad_once,
    redundant_train_call_skipped,
    remove_pending_shadows,
)
from stim_hf.training.optimizers import with_fused_kernel
from stim_hf.training.pace import PaceCallback, TrainingPace
from stim_hf.training.profiling import StepProfilerCallback, left_out_of_window, parse_profile_steps, phase
from stim_hf.training.reliable_trainer import ReliableTrainer
from stim_hf.training.subnet_evaluation import SubnetEvaluationMixin

logger = logging.getLogger(__name__)

# Logged training scalars (means over the logging interval, reduced across processes).
_LOG_KEYS = ("ce_loss", "kl_loss", "kl_coef", "subnet_depth_fraction", "subnet_input_size", "full_input_size")
# With sandwich sampling: the smallest sub-network's KL summed over the steps that ran it, and their number.
_SANDWICH_KEYS = ("smallest_kl_loss", "smallest_subnets")
# Set on a model once zero_init_residual has zeroed it: a second trainer on the same model leaves it alone.
_ZERO_INIT_MARK = "_stim_hf_zero_init_residual_done"
# Setups whose gradients are plain tensors on the process's device (not FSDP / DeepSpeed / XLA shards).
_PLAIN_GRADS = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
# Optimizer parameter-group keys that choose how the update runs, not what it computes.
_KERNEL_CHOICES = ("fused", "foreach")


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


class StimulativeTrainer(SubnetEvaluationMixin, ReliableTrainer):
    """A ``transformers.Trainer`` that trains a residual network stimulatively (ST / ST++).

    Each training step computes the full network's cross-entropy and, for ``num_subnets``
    sub-networks sampled from ``(seed, step)``, a KL loss from the detached full network's logits
    to the sub-network's (each on its own randomly down-scaled copy of the batch); one backward
    of the sum. Evaluation and prediction run the full network only. Use it like ``Trainer``,
    with :class:`~stim_hf.training.config.StimulativeTrainingArguments` as ``args``.

    ``batch_transform``, if given, finishes every batch once it is on the device (training,
    evaluation and BatchNorm recalibration alike), e.g. the pre-decoded pipeline's
    :class:`~stim_hf.data.device_augmentation.DeviceImageAugmentation`.
    """

    # compute_loss returns a per-micro-batch mean: the Trainer must divide it by the number of
    # gradient accumulation steps (DESIGN.md 3: it guesses wrong for models taking **kwargs).
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module | None = None,
        args: StimulativeTrainingArguments | None = None,
        batch_transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        **kwargs,
    ):
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
        self.batch_transform = batch_transform
        self._num_parameters: int | None = None
        self._walks = ModelWalks()
        self.family, self.stages, self.subnet_sampler = method_structures(self.model, args)
        self.full_input_sampler = full_input_sampler(self.model, self.family, self.stages, args)
        if self.full_input_sampler is not None and args.bn_policy != "recalibrate":
            logger.warning(
                "full_input_scale=%s: the BatchNorm running statistics average every input size the full network "
                "trains at, so evaluations and the saved model at the batch's own size score below what the "
                "network can (docs/training.md, 'Multi-resolution training'); bn_policy: recalibrate re-estimates them at that size before every evaluation and save",
                args.full_input_scale,
            )
        self._zero_init_residual(self.model)
        self._stim_sums: dict[str, Any] = {}
        self._stim_count = 0
        self._micro_step_key = (-1, 0)  # (global step, micro-batches seen in it)
        self._bn_recalibrated_at: int | None = None
        self._warned_no_estimation_data = False
        self._update_steps_per_epoch: int | None = None
        self._subnet_backward_scale: float | None = None
        # (global step, depth fraction, input side) of every sub-network drawn since the last
        # drain; read by monitoring callbacks (histograms), bounded so it never grows unread.
        self.sampled_subnets: deque[tuple[int, float, int]] = deque(maxlen=100_000)
        # Step and interval clocks since the last training log: data_wait_fraction, samples_per_second.
        self.pace = TrainingPace()
        self.add_callback(PaceCallback(self.pace))
        # True while a profile_steps window is recorded: stim_hf's phase labels are on.
        self.profiling = False
        self.profiled_time_left_out_s = 0.0  # evaluations and checkpoints inside profiling windows
        window = parse_profile_steps(args.profile_steps)
        if window is not None:
            self.add_callback(StepProfilerCallback(self, *window))
        self.collapse_monitor = CollapseMonitorCallback(args.on_collapse, kl_coef_now=self.current_kl_coef)
        self.add_callback(self.collapse_monitor)
        if args.subnet_monitor_count and self.stages:
            self.add_callback(SubnetMonitorCallback(self))

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """``Trainer.call_model_init``, prepared like a given model, its stages and sampler found anew.

        ``Trainer.train()`` builds a fresh model from ``model_init``; the sub-network passes must
        shorten that model's blocks, not those of the model built with the trainer.
        """
        model = prepare_model(super().call_model_init(trial), self.args)
        if hasattr(self, "stages"):  # called by train(), after __init__ found the first model's
            self.family, self.stages, self.subnet_sampler = method_structures(model, self.args)
            self.full_input_sampler = full_input_sampler(model, self.family, self.stages, self.args)
            self._zero_init_residual(model)
        return model

    def _zero_init_residual(self, model: nn.Module) -> None:
        """With ``zero_init_residual``, zero the BatchNorm weight ending each residual branch of ``model``, once.

        Done when the trainer is built (and for each model ``model_init`` builds), so it applies to a
        model passed through the Python API as to one the command line builds; a checkpoint resumed
        later overwrites these weights with its own. A model already zeroed by an earlier trainer is
        left alone, so a second trainer on a trained model does not undo its training.
        """
        if not self.args.zero_init_residual or model is None or getattr(model, _ZERO_INIT_MARK, False):
            return
        count = zero_init_residual_branches(self.family, self.stages)
        setattr(model, _ZERO_INIT_MARK, True)
        logger.info("zero_init_residual: zeroed the last BatchNorm weight of %d residual branches", count)

    def _build_sampler(self, seed: int, min_input_scale: float, stream: int = 0) -> SubnetSampler:
        return build_subnet_sampler(self.model, self.family, self.stages, self.args, seed, min_input_scale, stream)

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | int | None]:
        """``Trainer.get_batch_samples``, timed: the wait for batches and the images fetched make the logged pace."""
        self.pace.start_fetch()
        batches: list = []
        try:
            with phase(self.profiling, "stim_hf/wait_for_batches"):
                batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            return batches, num_items
        finally:
            self.pace.end_fetch(sum(self._batch_size(batch) for batch in batches))

    def _main_input_name(self) -> str:
        return getattr(self.model, "main_input_name", "pixel_values")

    def _batch_size(self, batch: Any) -> int:
        values = batch.get(self._main_input_name()) if isinstance(batch, dict) else None
        return int(values.shape[0]) if isinstance(values, torch.Tensor) and values.dim() > 0 else 0

    @contextmanager
    def _not_training_time(self, name: str) -> Iterator[None]:
        """An evaluation or a checkpoint: left out of the logged pace and of a profiling window's time per step."""
        started = time.perf_counter()
        try:
            with left_out_of_window(self, name):
                yield
        finally:
            self.pace.exclude_since(started)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``Trainer._prepare_inputs`` (to the device), then ``batch_transform`` if one was given."""
        inputs = super()._prepare_inputs(inputs)
        return self.batch_transform(inputs) if self.batch_transform is not None else inputs

    # ----------------------------------------------------------------------------------------------
    # Loss
    # ----------------------------------------------------------------------------------------------

    def set_initial_training_values(self, args: StimulativeTrainingArguments, dataloader: DataLoader) -> tuple:
        """``Trainer.set_initial_training_values``; keeps the update steps per epoch for the lambda schedule.

        Warns when ``stim_start_epoch`` leaves no stimulative phase in the run.
        """
        values = super().set_initial_training_values(args, dataloader)
        self._update_steps_per_epoch = values[1]
        epochs = values[6] / values[1]
        if args.uses_subnets and args.stim_start_epoch >= epochs:
            logger.warning(
                "stim_start_epoch=%s is at or after the end of training (%.4g epochs): the whole run is common "
                "training, without sub-networks",
                args.stim_start_epoch,
                epochs,
            )
        return values

    def current_kl_coef(self) -> float:
        """lambda at the current step: 0 before ``stim_start_epoch``, then the configured schedule.

        The schedule runs from ``stim_start_epoch`` to the run's last step, ``max_steps`` or a
        fractional ``num_train_epochs`` included.
        """
        args = self.args
        epoch = self.state.epoch or 0.0
        if not args.uses_subnets or self.subnet_sampler is None or epoch < args.stim_start_epoch:
            return 0.0
        # The run's length in epochs, fractional: the Trainer's num_train_epochs is rounded up.
        steps_per_epoch = self._update_steps_per_epoch
        total = self.state.max_steps / steps_per_epoch if steps_per_epoch else (self.state.num_train_epochs or 0)
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

        The sum runs over the ``num_subnets`` sampled sub-networks and, with ``sandwich``, the
        smallest one as well: each KL has the same weight, as one more sampled sub-network would.
        Outside training (evaluation, prediction) only the full network runs and its outputs
        are returned, so predictions come from the full network alone.
        """
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        if self.args.channels_last and pixel_values.dim() == 4:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        elif self.args.world_size > 1:
            # Channels-last images (the predecoded pipeline's) into a channels-first model give channels-last
            # weight gradients, which DDP, its buckets laid out like the parameters, copies and warns about.
            pixel_values = pixel_values.contiguous()
        if not model.training:
            outputs = model(pixel_values=pixel_values)
            ce = self.main_loss(outputs.logits, labels)
            return (ce, outputs) if return_outputs else ce

        step, micro_step = self._next_micro_step()
        full_size = pixel_values.shape[-2]
        if self.full_input_sampler is not None:  # multi-resolution training: the full network at a drawn size
            full_size = self.full_input_sampler.sample(step, micro_step, 0, image_size=full_size).input_size
        full_input = resize_input(pixel_values, full_size)
        forward_kwargs = self.family.resized_forward_kwargs if full_input is not pixel_values else {}
        with phase(self.profiling, "stim_hf/full_forward"):
            outputs = model(pixel_values=full_input, **forward_kwargs)
            logits = outputs.logits
            ce = self.main_loss(logits, labels)
        coef = self.current_kl_coef()
        loss = ce
        terms: list[tuple[str, torch.Tensor, Subnet | None]] = [("ce_loss", ce, None)]
        kl_sum = ce.new_zeros(())
        depth_sum = size_sum = 0.0
        num_random = self.args.num_subnets if coef > 0 else 0
        # Sandwich sampling: the smallest sub-network after the K random ones (the same on every process).
        indices: list[int | None] = [*range(num_random), *([None] if coef > 0 and self.args.sandwich else [])]
        num_subnets = len(indices)
        smallest_kl = None
        for index in indices:
            if index is None:
                subnet = self.subnet_sampler.smallest(image_size=pixel_values.shape[-2])
            else:
                subnet = self.subnet_sampler.sample(step, micro_step, index, image_size=pixel_values.shape[-2])
            with phase(self.profiling, "stim_hf/subnet_forward"):
                kl = self.subnet_kl(model, pixel_values, logits, subnet)
            if self._subnet_backward_scale is not None:
                # Sequential strategy: free this sub-network's graph now; the CE's backward follows.
                self.accelerator.backward(coef * self._subnet_backward_scale * kl)
                kl = kl.detach()
            kl_sum = kl_sum + kl
            terms.append((f"kl_loss_{'smallest' if index is None else index}", kl, subnet))
            if index is None:
                smallest_kl = kl
            size = subnet.input_size or pixel_values.shape[-2]
            depth_sum += subnet.depth_fraction
            size_sum += size
            self.sampled_subnets.append((step, subnet.depth_fraction, size))
        if num_subnets:
            loss = loss + coef * kl_sum
        self.note_loss_terms(step, micro_step, terms, labels)
        self._record(ce, kl_sum / max(num_subnets, 1), coef, depth_sum, size_sum, num_subnets, smallest_kl, full_size)
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

        The Trainer's per-step ``model.train()`` and ``model.zero_grad()`` walks are replaced by
        cheaper equivalents (:mod:`stim_hf.training.model_walks`).
        """
        # One device or DDP only: DeepSpeed's and FSDP's wrappers keep their own train() / zero_grad().
        plain = self._plain_setup()
        with (
            redundant_train_call_skipped(model) if plain else nullcontext(),
            phase(self.profiling, "stim_hf/training_step"),
        ):
            loss = self._forward_backward(model, inputs, num_items_in_batch)
        # Asked after the backward: the Trainer's tensor-parallel check caches what the first gradients show.
        parameters = self._plain_parameters(model) if plain and self.accelerator.sync_gradients else None
        if parameters is not None:
            fast_zero_grad_once(model, parameters)  # the Trainer's zero_grad after this optimizer step
        return loss

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; a run that stops early (an error, a non-finite loss) leaves no step shortcut on the model."""
        self.pace.reset()
        try:
            return super().train(*args, **kwargs)
        finally:
            for model in (self.model, self.model_wrapped):
                if isinstance(model, nn.Module):
                    remove_pending_shadows(model)

    def _forward_backward(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor:
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
        # The layers are listed outside use_subnet, which hides the dropped blocks' layers.
        bn_context = (
            frozen_running_stats(self._walks.batchnorm_layers(model))
            if args.bn_policy == "main_only"
            else nullcontext()
        )
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
    # Per-step bookkeeping of the Trainer, made cheap (docs/benchmarks.md, framework overhead)
    # ----------------------------------------------------------------------------------------------

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """``Trainer.floating_point_ops`` (6 x input elements x parameters) with the parameter count taken once.

        The Trainer recounts the parameters, walking every module, on every step.
        """
        main_input = self._main_input_name()
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._num_parameters is None:
            self._num_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._num_parameters

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: Any, model: nn.Module | None = None) -> tuple[Any, Any]:
        """``Trainer.get_optimizer_cls_and_kwargs``, with torch's fused kernel where ``fused_optimizer`` asks for it.

        One device or DDP only (FSDP and DeepSpeed build their optimizers over their own shards).
        """
        optimizer_cls, optimizer_kwargs = ReliableTrainer.get_optimizer_cls_and_kwargs(args, model)
        if getattr(args, "fused_optimizer", False) and model is not None and not (args.deepspeed or args.fsdp):
            optimizer_kwargs = with_fused_kernel(optimizer_cls, optimizer_kwargs, model.parameters())
        return optimizer_cls, optimizer_kwargs

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """``Trainer._load_optimizer_and_scheduler``, keeping the update kernels this run chose.

        A saved optimizer state carries its ``fused`` / ``foreach`` choice in each parameter group and
        would put it back: a checkpoint from before ``fused_optimizer``, or written with another setting,
        would silently change this run's kernels. They are an implementation choice, not training state.
        """
        if self.optimizer is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        built = [{key: group[key] for key in _KERNEL_CHOICES if key in group} for group in self.optimizer.param_groups]
        super()._load_optimizer_and_scheduler(checkpoint)
        for group, choice in zip(self.optimizer.param_groups, built, strict=True):
            group.update(choice)

    def _plain_setup(self) -> bool:
        """One device or DDP: no FSDP, DeepSpeed or XLA wrapper owns the parameters."""
        return not (self.is_fsdp_enabled or self.is_deepspeed_enabled) and (
            self.accelerator.distributed_type in _PLAIN_GRADS
        )

    def _plain_parameters(self, model: nn.Module) -> list[nn.Parameter] | None:
        """The model's parameters, listed once, where their gradients are plain tensors (one device, or DDP)."""
        if not self._plain_setup():
            return None
        has_mixed_mesh = getattr(self, "_has_mixed_mesh_grads", None)
        if has_mixed_mesh is not None and has_mixed_mesh(model):
            return None
        return self._walks.parameters(model)

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        """Clip to ``max_grad_norm`` as accelerate does (unscale, then torch's clip), over a parameter list kept once."""
        parameters = self._plain_parameters(model)
        if parameters is None:
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        return torch.nn.utils.clip_grad_norm_(parameters, self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: torch.Tensor | float | None = None) -> Any:
        """The gradient norm the Trainer logs; without clipping, one fused norm over the kept parameter list."""
        parameters = self._plain_parameters(model) if grad_norm is None else None
        if parameters is None:
            return super()._get_grad_norm(model, grad_norm)
        # As accelerate's clip_grad_norm_: fp16 gradients carry the GradScaler's loss scale until unscaled.
        self.accelerator.unscale_gradients()
        grads = [p.grad for p in parameters if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.args.device)

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
        smallest_kl: torch.Tensor | None = None,
        full_size: int = 0,
    ) -> None:
        # Device tensors are summed without .item(): no host-device sync inside the step.
        sums = self._stim_sums
        if smallest_kl is not None:
            sums["smallest_kl_loss"] = sums.get("smallest_kl_loss", 0.0) + smallest_kl.detach()
            sums["smallest_subnets"] = sums.get("smallest_subnets", 0) + 1
        sums["ce_loss"] = sums.get("ce_loss", 0.0) + ce.detach()
        sums["kl_loss"] = sums.get("kl_loss", 0.0) + kl.detach()
        sums["kl_coef"] = sums.get("kl_coef", 0.0) + coef
        sums["subnet_depth_fraction"] = sums.get("subnet_depth_fraction", 0.0) + depth_sum
        sums["subnet_input_size"] = sums.get("subnet_input_size", 0.0) + size_sum
        sums["full_input_size"] = sums.get("full_input_size", 0.0) + full_size
        sums["subnets"] = sums.get("subnets", 0) + num_subnets
        self._stim_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the stimulative scalars (means since the last log, across processes) to training logs.

        Also the pace since the last log (:class:`~stim_hf.training.pace.TrainingPace`):

        - ``samples_per_second``: training images per second, all processes together, evaluation
          and checkpointing left out;
        - ``data_wait_fraction``: the share of step time (from fetching a step's batches to the end
          of its optimizer step) spent waiting for the batches, the largest over processes. Near 0
          the data pipeline keeps up; a large value means the accelerator waits for data (more
          ``dataloader_num_workers``, ``image_pipeline: predecoded``).
        """
        if "loss" in logs:
            fraction, samples, seconds = self.pace.take_interval()
            if self.accelerator.num_processes > 1:
                # The most data-starved process holds the others back; images add up.
                per_process = self.accelerator.gather(torch.tensor([[fraction, samples]], device=self.args.device))
                fraction, samples = per_process[:, 0].max().item(), int(per_process[:, 1].sum().item())
            logs["data_wait_fraction"] = fraction
            if seconds > 0:
                logs["samples_per_second"] = samples / seconds
        if "loss" in logs and self._stim_count:
            sums = self._stim_sums
            device = self.args.device
            # Every process runs the same sub-networks: the keys, and so the reduced tensor, are alike on all.
            sandwich_keys = _SANDWICH_KEYS if self.args.sandwich else ()
            values = torch.stack(
                [torch.as_tensor(sums[k], dtype=torch.float32, device=device) for k in _LOG_KEYS]
                + [torch.as_tensor(sums.get(k, 0.0), dtype=torch.float32, device=device) for k in sandwich_keys]
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
            if self.full_input_sampler is not None:
                logs["full_input_size"] = values[5] / steps
            if sandwich_keys and values[len(_LOG_KEYS) + 1]:
                logs["smallest_kl_loss"] = values[len(_LOG_KEYS)] / values[len(_LOG_KEYS) + 1]
            self._stim_sums, self._stim_count = {}, 0
        super().log(logs, start_time)

    # ----------------------------------------------------------------------------------------------
    # Evaluation and saving: BatchNorm recalibration first (subnet_evaluation.py holds the rest)
    # ----------------------------------------------------------------------------------------------

    def _maybe_recalibrate_bn(self) -> None:
        if self.args.bn_policy == "recalibrate" and self._bn_recalibrated_at != self.state.global_step:
            self.recalibrate_bn()

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """``Trainer.evaluate`` after BatchNorm recalibration when ``bn_policy='recalibrate'``.

        Its time is not training time: left out of the logged pace and of a profiling window.
        """
        with self._not_training_time("stim_hf/evaluate"):
            self._maybe_recalibrate_bn()
            return super().evaluate(*args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """``ReliableTrainer._save_checkpoint``; its time is left out of the logged pace and of a profiling window."""
        with self._not_training_time("stim_hf/save_checkpoint"):
            super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` after BatchNorm recalibration when ``bn_policy='recalibrate'``."""
        self._maybe_recalibrate_bn()
        super().save_model(output_dir, _internal_call)

"""Configuration of stimulative training: a ``TrainingArguments`` subclass, the way TRL does it."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

from stim_hf.errors import ConfigError
from stim_hf.method.batchnorm import DEFAULT_RECALIBRATION_SAMPLES
from stim_hf.method.losses import KL_LOSSES, LOGIT_NORMALIZATIONS
from stim_hf.method.sampling import SAMPLING_RULES
from stim_hf.training.collapse import COLLAPSE_ACTIONS
from stim_hf.training.profiling import parse_profile_steps

logger = logging.getLogger(__name__)

STIM_METHODS = ("ct", "st", "stpp")
KL_COEF_SCHEDULES = ("constant", "cosine_up", "cosine_down")
BN_POLICIES = ("main_only", "recalibrate", "none")
BACKWARD_STRATEGIES = ("summed", "sequential")
NONFINITE_LOSS_ACTIONS = ("stop", "skip")
# The learning-rate schedules lr_floor applies to: transformers' cosine schedules that take a floor
# (min_lr_rate, a share of learning_rate); 'cosine' becomes 'cosine_with_min_lr', the same curve lifted.
LR_FLOOR_SCHEDULES = ("cosine", "cosine_with_min_lr", "cosine_warmup_with_min_lr")

# The fields a method preset fills; a value set explicitly (not None) wins over the preset.
# The preset fields that make a method what it is (K and the sample space are its settings).
METHOD_DEFINING_FIELDS = ("subnet_sampling", "kl_loss", "min_input_scale")
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    # Common training: no sub-network passes at all.
    "ct": {
        "num_subnets": 0,
        "subnet_sampling": "prefix",
        "sample_space": "full",
        "kl_loss": "kl",
        "min_input_scale": 1.0,
    },
    # ST (NeurIPS 2022): a random subset of the skippable blocks, plain KL, full resolution.
    "st": {
        "num_subnets": 1,
        "subnet_sampling": "subset",
        "sample_space": "full",
        "kl_loss": "kl",
        "min_input_scale": 1.0,
    },
    # ST++: per-stage prefixes, direction-only KL ("KL-"), random smaller inputs (released: 0.43 S .. S).
    "stpp": {
        "num_subnets": 1,
        "subnet_sampling": "prefix",
        "sample_space": "full",
        "kl_loss": "kl_direction",
        "min_input_scale": 0.43,
    },
}


@dataclass(frozen=True)
class NumberRange:
    """The values a numeric field accepts: an interval, integers only or any finite number, unset or not."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False  # None (unset) is accepted

    def describe(self) -> str:
        """The interval as the messages write it, e.g. ``[1, inf)``."""
        left, right = "(" if self.low_open else "[", ")" if self.high_open or not math.isfinite(self.high) else "]"
        return f"{left}{self.low}, {self.high if math.isfinite(self.high) else 'inf'}{right}"


SEED_MAX = 2**32 - 1  # numpy's seeds
# Every number a run depends on, checked at parse in one place (StimulativeTrainingArguments.check_numbers): the
# stimulative fields and the TrainingArguments fields the trainer relies on. Intervals in steps (save_steps, ...),
# warmup_steps and max_steps have rules of their own beside the table.
NUMERIC_FIELDS: dict[str, NumberRange] = {
    # stimulative training
    "kl_coef": NumberRange(0.0),
    "stim_start_epoch": NumberRange(0.0),
    "num_subnets": NumberRange(0, integer=True),
    "kl_temperature": NumberRange(0.0, low_open=True),
    "logit_amplitude": NumberRange(0.0, low_open=True),
    "min_input_scale": NumberRange(0.0, 1.0, low_open=True),
    "full_input_scale": NumberRange(0.0, 1.0, low_open=True),
    "subnet_size_bias": NumberRange(0.0, 1.0, high_open=True),
    "lr_floor": NumberRange(0.0, 1.0, high_open=True),
    "bn_recalibration_samples": NumberRange(1, integer=True),
    "num_eval_subnets": NumberRange(0, integer=True),
    "subnet_bn_recalibration_samples": NumberRange(0, integer=True),
    "subnet_monitor_count": NumberRange(0, integer=True),
    "subnet_monitor_every": NumberRange(1, integer=True),
    # batches, epochs, accumulation
    "per_device_train_batch_size": NumberRange(1, integer=True),
    "per_device_eval_batch_size": NumberRange(1, integer=True),
    "num_train_epochs": NumberRange(0.0, low_open=True),
    "gradient_accumulation_steps": NumberRange(1, integer=True),
    "eval_accumulation_steps": NumberRange(1, integer=True, optional=True),
    # optimisation
    "learning_rate": NumberRange(0.0, low_open=True),
    "weight_decay": NumberRange(0.0),
    "max_grad_norm": NumberRange(0.0),
    "adam_beta1": NumberRange(0.0, 1.0, high_open=True),
    "adam_beta2": NumberRange(0.0, 1.0, high_open=True),
    "adam_epsilon": NumberRange(0.0, low_open=True),
    "label_smoothing_factor": NumberRange(0.0, 1.0, high_open=True),
    # evaluation, checkpoints, data loading, seeds
    "eval_delay": NumberRange(0.0),
    "save_total_limit": NumberRange(1, integer=True, optional=True),
    "dataloader_num_workers": NumberRange(0, integer=True),
    "dataloader_prefetch_factor": NumberRange(1, integer=True, optional=True),
    "torch_empty_cache_steps": NumberRange(1, integer=True, optional=True),
    "seed": NumberRange(0, SEED_MAX, integer=True),
    "data_seed": NumberRange(0, SEED_MAX, integer=True, optional=True),
}
# Save, eval and logging intervals: in steps (a whole number >= 1) or a share of the run (0 < x < 1) where their
# strategy is "steps".
INTERVAL_FIELDS = {"save_steps": "save_strategy", "eval_steps": "eval_strategy", "logging_steps": "logging_strategy"}


def check_number(name: str, value: Any, valid: NumberRange) -> None:
    """Raise a one-line :class:`ConfigError` naming ``name``, ``value`` and the range when ``value`` is not in it."""
    if value is None and valid.optional:
        return
    kind = "an integer" if valid.integer else "a number"
    ok_type = isinstance(value, int) if valid.integer else isinstance(value, (int, float))
    # A float field must be a finite float (a huge int overflows); an int field any int.
    if isinstance(value, bool) or not ok_type or (not valid.integer and not _finite_float(value)):
        shown = f"{value!r}" if len(repr(value)) <= 40 else f"{repr(value)[:37]}..."
        unset = " (or unset)" if valid.optional else ""
        raise ConfigError(f"{name}={shown} must be {kind} in {valid.describe()}{unset}")
    below = value < valid.low or (valid.low_open and value == valid.low)
    above = value > valid.high or (valid.high_open and value == valid.high)
    if below or above:
        raise ConfigError(f"{name}={value!r} is out of range; valid: {valid.describe()}")


def _check_steps_or_share(name: str, value: Any, zero_allowed: bool = False, rule: str = "") -> None:
    """A count of steps (a whole number >= 1) or a share of the run (below 1): save/eval/logging intervals and the
    warm-up, which may also be 0."""
    check_number(name, value, NumberRange(0.0, low_open=not zero_allowed))
    if value >= 1 and value != int(value):
        share = "[0, 1)" if zero_allowed else "(0, 1)"
        raise ConfigError(
            f"{name}={value!r} is neither a whole number of steps (>= 1) nor a share of the run in {share}"
            + (f"; {rule}" if rule else "")
        )


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, MPS, ...), the test its DataLoader pins memory by."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def parse_sample_space(value: Any) -> str | list[int]:
    """Read ``sample_space`` from YAML (a list) or the command line (``1,2,4,1``, ``[1, 2, 4, 1]``, ``full``)."""
    original = value
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "full":
            return "full"
        try:
            value = json.loads(text) if text.startswith("[") else [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            value = None
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        return list(value)
    raise ConfigError(
        f"sample_space={original!r} is not valid: give 'full' or one non-negative integer per residual stage, "
        "the most blocks sampling may drop from it (e.g. [0, 1, 3, 0] or '0,1,3,0')"
    )


# Every preset sets these fields (None in the arguments means "the preset's").
METHOD_PRESET_FIELDS = tuple(METHOD_PRESETS["stpp"])


def method_settings(stim_method: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The preset fields of ``stim_method``: the values in ``given`` that are not None, else the preset's.

    How :class:`StimulativeTrainingArguments` completes a method's settings; ConfigError for an
    unknown method.
    """
    if not isinstance(stim_method, str) or stim_method not in METHOD_PRESETS:
        raise ConfigError(f"stim_method={stim_method!r} is not a method; valid: {', '.join(STIM_METHODS)}")
    return {
        name: preset if given.get(name) is None else given[name] for name, preset in METHOD_PRESETS[stim_method].items()
    }


@dataclass
class StimulativeTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the settings of stimulative training (ST / ST++).

    ``stim_method`` is a preset (``ct``, ``st``, ``stpp``) that fills ``num_subnets``,
    ``subnet_sampling``, ``sample_space``, ``kl_loss`` and ``min_input_scale``; any of them set
    explicitly overrides the preset. Every value is validated in ``__post_init__`` and a bad one
    raises :class:`~stim_hf.errors.ConfigError` naming the field, the value and the valid range.
    """

    stim_method: str = field(
        default="stpp",
        metadata={"help": "Preset: 'ct' (common training), 'st' (ST, NeurIPS 2022) or 'stpp' (ST++)."},
    )
    kl_coef: float = field(default=1.0, metadata={"help": "Weight lambda of the sub-network KL loss (>= 0)."})
    kl_coef_schedule: str = field(
        default="constant",
        metadata={"help": "How lambda evolves over training: 'constant', 'cosine_up' (0 -> lambda), 'cosine_down'."},
    )
    stim_start_epoch: float = field(
        default=0.0, metadata={"help": "Epoch at which sub-network sampling begins (common training before)."}
    )
    num_subnets: int | None = field(
        default=None, metadata={"help": "Sub-networks K per training step (>= 0). Preset: ct 0, st/stpp 1."}
    )
    kl_loss: str | None = field(
        default=None,
        metadata={
            "help": "'kl' (plain KL) or 'kl_direction' (ST++ 'KL-': logits normalised). Preset: st kl, stpp kl_direction."
        },
    )
    preset_departures: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated fields among subnet_sampling, kl_loss, min_input_scale that the recipe sets away "
            "from its stim_method's preset on purpose (e.g. kl_loss): they are used without the warning that "
            "otherwise names such a field (which catches a stim_method changed on the command line under a "
            "recipe that pinned another method's values)."
        },
    )
    kl_temperature: float = field(
        default=1.0, metadata={"help": "Distillation temperature T (> 0); the KL is scaled by T^2."}
    )
    logit_amplitude: float = field(
        default=1.0,
        metadata={"help": "Amplitude A of normalised logits for 'kl_direction' (> 0; released: 1)."},
    )
    logit_normalization: str = field(
        default="layernorm",
        metadata={"help": "How 'kl_direction' normalises logits: 'layernorm' (released) or 'l2'."},
    )
    normalize_main_logits: bool = field(
        default=False,
        metadata={
            "help": "Also train the full network's cross-entropy on normalised logits, as the released ST++ code "
            "does. Off by default: with few classes it caps the reachable confidence (docs/training.md, 'KL- and the main loss')."
        },
    )
    subnet_sampling: str | None = field(
        default=None,
        metadata={
            "help": "'prefix' (ST++: keep a prefix of every stage) or 'subset' (ST: any subset of skippable blocks)."
        },
    )
    sample_space: str | None = field(
        default=None,
        metadata={
            "help": "Per-stage maximum number of blocks sampling may drop, e.g. '0,1,3,0' or [0, 1, 3, 0], or 'full' "
            "(every skippable block). Released ST++ 'space3' [1,2,4,1] (sample-space sizes) is [0,1,3,0] here."
        },
    )
    min_input_scale: float | None = field(
        default=None,
        metadata={
            "help": "Sub-network input side ~ UniformInt[floor(scale*S), S] for batch side S; 1.0 disables. Preset: stpp 0.43."
        },
    )
    full_input_scale: float = field(
        default=1.0,
        metadata={
            "help": "Multi-resolution training of the full network: each training step runs it on the batch resized "
            "to a side ~ UniformInt[floor(scale*S), S] for batch side S, by the sub-networks' rule (min_input_scale), "
            "drawn from the seed and the step alike on every process; evaluation stays at S. 1.0 (default) keeps "
            "the batch's size. 0.43 draws the sizes ST++ draws for its sub-networks (13..32 at 32 px)."
        },
    )
    sandwich: bool = field(
        default=False,
        metadata={
            "help": "Sandwich sampling (BigNAS): every step also trains the smallest sub-network of the sample space "
            "(each stage at the fewest blocks sample_space allows, at the smallest input size min_input_scale "
            "allows), beside the num_subnets random ones; its KL is added to the sum like theirs. With "
            "num_subnets: 0, only the smallest."
        },
    )
    subnet_size_bias: float = field(
        default=0.0,
        metadata={
            "help": "Tilt the random draws of each stage's depth and of the input size toward the smaller ones, in "
            "[0, 1): with the choices ordered from the smallest, the probability of the i smallest, G without bias, "
            "becomes G ** (1 - bias). 0: uniform (the released rules)."
        },
    )
    zero_init_residual: bool = field(
        default=False,
        metadata={
            "help": "Zero the weight (gamma) of the BatchNorm that ends each residual branch when the trainer is "
            "built, so every block starts as its shortcut (CIFAR ResNet, HF ResNet / RegNet, timm ResNet; refused "
            "for other families and for a pretrained model)."
        },
    )
    lr_floor: float = field(
        default=0.0,
        metadata={
            "help": "The learning rate never falls below lr_floor x learning_rate after the warm-up, in [0, 1): the "
            "cosine schedule becomes transformers' cosine_with_min_lr (min_lr_rate = lr_floor). Cosine schedules "
            "only."
        },
    )
    bn_policy: str = field(
        default="main_only",
        metadata={
            "help": "'main_only': sub-network passes leave BatchNorm running statistics untouched; 'recalibrate': "
            "re-estimate them on bn_recalibration_samples training images before every evaluation and save "
            "(released code); 'none': sub-network passes update them too."
        },
    )
    bn_recalibration_samples: int = field(
        default=2000,
        metadata={"help": "Training images used to re-estimate BatchNorm statistics ('recalibrate')."},
    )
    num_eval_subnets: int = field(
        default=4,
        metadata={"help": "Fixed random sub-networks evaluated at the end of training to report loafing (0: none)."},
    )
    subnet_bn_recalibration_samples: int = field(
        default=DEFAULT_RECALIBRATION_SAMPLES,
        metadata={
            "help": "Training images each evaluated sub-network's BatchNorm statistics are re-estimated on before it "
            "is scored (end-of-training report, evaluate_subnets, the sub-network monitor); the figures with the "
            "full network's statistics (inherited, the papers' loafing measure) are reported beside them. 0: the "
            "inherited figures only. The full network is never changed."
        },
    )
    subnet_monitor_count: int = field(
        default=0,
        metadata={
            "help": "Fixed sub-networks evaluated at every evaluation during training and logged to TensorBoard "
            "(eval/subnet_accuracy_mean, _min, _max and a loafing plot); 0 disables."
        },
    )
    subnet_monitor_every: int = field(
        default=1, metadata={"help": "Run the sub-network monitor at every n-th evaluation (>= 1)."}
    )
    on_nonfinite_loss: str = field(
        default="stop",
        metadata={
            "help": "What a NaN / inf loss does: 'stop' (save the weights, the batch labels and a report to "
            "output_dir/nonfinite-step-N, then stop with a message naming the loss term) or 'skip' (drop that "
            "optimizer step's update, log a warning and count it in nonfinite_skipped_steps)."
        },
    )
    on_collapse: str = field(
        default="warn",
        metadata={
            "help": "What a collapsed run does (after the first epoch, or 100 steps past the warm-up if sooner: "
            "training cross-entropy at about ln C for 3 logs in a row, evaluation accuracy at chance, or 90 percent "
            "of predictions one class): 'warn' (log a warning "
            "naming lambda, the lambda in effect and the remedies for it, and record it in trainer_state.json; a "
            "later recovery is logged too), 'stop' (raise, the job exits non-zero) or 'ignore'."
        },
    )
    backward_strategy: str = field(
        default="summed",
        metadata={
            "help": "'summed': one backward of CE + lambda * sum of KLs; 'sequential': backward of each "
            "sub-network's KL right after its forward, then of the CE (the released code's way: the peak holds "
            "one sub-network's activations instead of K). See docs/benchmarks.md for what each costs."
        },
    )
    sync_batchnorm: bool = field(
        default=False,
        metadata={
            "help": "Convert BatchNorm to SyncBatchNorm before wrapping (multi-GPU: statistics over the global "
            "batch). Ignored with a single process; refused on CPU, where torch has no SyncBatchNorm kernel."
        },
    )
    channels_last: bool = field(
        default=False, metadata={"help": "Run convolutional models in channels_last memory format (faster on GPUs)."}
    )
    fused_optimizer: bool = field(
        default=True,
        metadata={
            "help": "Give optim sgd / adamw_torch torch's fused kernel (one pass over all parameters instead of one "
            "per tensor) on one device or DDP, where every parameter is on a device torch has fused kernels for. "
            "The update is the same up to rounding; false keeps the Trainer's optimizer as it builds it."
        },
    )
    profile_steps: str | None = field(
        default=None,
        metadata={
            "help": "Record optimizer steps FIRST-LAST (e.g. '20-25', counted from 1) with torch.profiler: a trace "
            "(Perfetto, chrome://tracing, TensorBoard) and a summary of where each step's time goes, written to "
            "OUTPUT_DIR/profile/. Unset: no profiling."
        },
    )
    # Defaults that differ from TrainingArguments' (DESIGN.md section 3).
    do_train: bool = field(default=True, metadata={"help": "Train (default); false only evaluates the model."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False with on-the-fly image transforms."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "False: the main pass uses every parameter. True breaks the two forwards and one backward of "
            "backward_strategy 'summed' (refused); 'sequential' works with it."
        },
    )
    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={
            "help": "Pin the batches' host memory, for copies to the accelerator that need not wait. Unset: on when "
            "an accelerator trains (not with use_cpu), off on a CPU, where torch pins nothing and would warn at "
            "every data loader."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "The Trainer's NaN/inf filter of the logged loss. Off: on_nonfinite_loss handles non-finite "
            "losses (a skipped step counts in the logged loss as the filter would), and the filter's check waits "
            "for every step's backward on a GPU."
        },
    )

    def __post_init__(self) -> None:
        explicit = self._apply_method_preset()
        self._validate_stimulative_fields()
        self.check_numbers()
        self._check_method_is_what_its_name_says(explicit)
        given = self.accelerator_config
        non_blocking_given = not (given is None or (isinstance(given, dict) and "non_blocking" not in given))
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = not self.use_cpu and accelerator_available()
        try:
            super().__post_init__()
        except ValueError as error:  # TrainingArguments' own checks (report_to, strategies, ...): one line, too
            message = " ".join(str(error).split())
            raise ConfigError(f"{message} (a TrainingArguments setting, from the recipe or the command line)") from None
        self._check_report_to()
        self._apply_lr_floor()
        if not non_blocking_given:
            # A blocking copy of a batch to the GPU first waits for the previous step's backward;
            # from pinned memory (dataloader_pin_memory, off on CPUs) it can be queued instead.
            self.accelerator_config.non_blocking = self.dataloader_pin_memory

    def _apply_method_preset(self) -> dict[str, Any]:
        """Fill the preset fields left unset; return those that were set explicitly."""
        given = {name: getattr(self, name) for name in METHOD_PRESET_FIELDS}
        for name, value in method_settings(self.stim_method, given).items():
            setattr(self, name, value)
        return {name: value for name, value in given.items() if value is not None}

    def _check_method_is_what_its_name_says(self, explicit: dict[str, Any]) -> None:
        """Refuse ``ct`` with sub-network passes; name the fields that make ``st`` / ``stpp`` differ from their preset.

        A recipe pins preset fields (``num_subnets: 1``): changing only ``stim_method`` on the
        command line would otherwise leave the pinned method running under the new name.
        """
        if self.stim_method == "ct" and self.uses_subnets:
            sandwich = " and sandwich=true" if self.sandwich else ""
            raise ConfigError(
                f"stim_method='ct' (common training) runs no sub-networks, but num_subnets={self.num_subnets}"
                f"{sandwich} and kl_coef={self.kl_coef} (from the recipe or the command line) would train them; set "
                f"num_subnets: 0{' and sandwich: false' if sandwich else ''} as well, or choose stim_method st or stpp"
            )
        preset = METHOD_PRESETS[self.stim_method]
        intended = set((self.preset_departures or "").split(","))
        differing = {
            name: value
            for name, value in explicit.items()
            if name in METHOD_DEFINING_FIELDS and value != preset[name] and name not in intended
        }
        if differing:
            logger.warning(
                "stim_method='%s' with %s set explicitly, where its preset has %s: the values set are used; "
                "if that is not intended, drop them from the recipe or the command line to run the preset (if it is, "
                "name them in preset_departures)",
                self.stim_method,
                ", ".join(f"{name}={value!r}" for name, value in differing.items()),
                ", ".join(f"{name}={preset[name]!r}" for name in differing),
            )

    def _normalize_preset_departures(self) -> None:
        """Check ``preset_departures`` (comma-separated names, or a YAML list of them: method-defining fields
        only) and keep it as one comma-separated string, or None."""
        value = self.preset_departures
        if value is None:
            return
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list | tuple) or not all(isinstance(name, str) for name in value):
            raise ConfigError(
                f"preset_departures={self.preset_departures!r} is not a list of field names; give them "
                f"comma-separated (kl_loss,min_input_scale) or as a YAML list"
            )
        names = sorted({name.strip() for name in value if name.strip()})
        unknown = [name for name in names if name not in METHOD_DEFINING_FIELDS]
        if unknown:
            raise ConfigError(
                f"preset_departures names {', '.join(unknown)}, which no method preset sets; valid: "
                f"{', '.join(METHOD_DEFINING_FIELDS)} (comma-separated)"
            )
        self.preset_departures = ",".join(names) or None

    def _validate_stimulative_fields(self) -> None:
        def choice(name: str, valid: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in valid:
                raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(valid)}")

        choice("kl_coef_schedule", KL_COEF_SCHEDULES)
        choice("kl_loss", KL_LOSSES)
        choice("logit_normalization", LOGIT_NORMALIZATIONS)
        choice("subnet_sampling", SAMPLING_RULES)
        choice("bn_policy", BN_POLICIES)
        choice("backward_strategy", BACKWARD_STRATEGIES)
        choice("on_nonfinite_loss", NONFINITE_LOSS_ACTIONS)
        self._normalize_preset_departures()
        choice("on_collapse", COLLAPSE_ACTIONS)
        self.sample_space = parse_sample_space(self.sample_space)
        parse_profile_steps(self.profile_steps)
        for name in (
            "normalize_main_logits",
            "sandwich",
            "zero_init_residual",
            "sync_batchnorm",
            "channels_last",
            "fused_optimizer",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.ddp_find_unused_parameters and self.uses_subnets and self.backward_strategy == "summed":
            raise ConfigError(
                "ddp_find_unused_parameters=true breaks DDP training with sub-network passes and "
                "backward_strategy='summed' (two forwards, one backward: 'Expected to mark a variable ready only "
                "once'); leave it false (the full network's pass uses every parameter), or, for a model whose "
                "forward leaves parameters unused, set backward_strategy: sequential"
            )

    def check_numbers(self) -> None:
        """Check every numeric setting of :data:`NUMERIC_FIELDS`, the step intervals, ``warmup_steps``,
        ``max_steps`` and ``optim_args`` (one ``ConfigError`` line naming the field, the value and the range)."""
        for name, valid in NUMERIC_FIELDS.items():
            if hasattr(self, name):  # a field of the transformers release in use
                check_number(name, getattr(self, name), valid)
        for name, strategy_field in INTERVAL_FIELDS.items():
            strategy = getattr(self, strategy_field)
            value = getattr(self, name)
            if str(getattr(strategy, "value", strategy)) == "steps" and value is not None:
                _check_steps_or_share(name, value, rule=f"{strategy_field} is 'steps'")
        _check_steps_or_share("warmup_steps", self.warmup_steps, zero_allowed=True)
        if hasattr(self, "warmup_ratio") and self.warmup_ratio is not None:  # transformers releases that have it
            check_number("warmup_ratio", self.warmup_ratio, NumberRange(0.0, 1.0))
        check_number("max_steps", self.max_steps, NumberRange(-1, integer=True))
        if self.max_steps == 0:
            raise ConfigError("max_steps=0 is out of range; valid: -1 (train num_train_epochs) or [1, inf)")
        if self.optim_args:
            pairs = [p for p in str(self.optim_args).replace(" ", "").split(",") if p]
            bad = [p for p in pairs if p.count("=") != 1 or not all(p.split("="))]
            if bad:
                raise ConfigError(
                    f"optim_args={self.optim_args!r} must be comma-separated key=value pairs (e.g. "
                    f"'momentum=0.9,nesterov=true'); not a pair: {', '.join(map(repr, bad))}"
                )

    def _apply_lr_floor(self) -> None:
        """Give a cosine schedule the floor ``lr_floor`` (transformers' ``min_lr_rate``); refuse other schedules.

        ``cosine`` becomes ``cosine_with_min_lr`` (the same curve, lifted: lr = floor + (1 - floor) x
        cosine); the ``*_min_lr`` cosine schedules get ``min_lr_rate`` in ``lr_scheduler_kwargs``,
        unless those already set another floor. Applying it twice (arguments read back from a run's
        ``training_args.json``) changes nothing.
        """
        if not self.lr_floor:
            return
        schedule = str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type))
        if schedule not in LR_FLOOR_SCHEDULES:
            raise ConfigError(
                f"lr_floor={self.lr_floor} cannot apply to lr_scheduler_type={schedule!r}; it takes a cosine "
                f"schedule: {', '.join(LR_FLOOR_SCHEDULES)} (or set lr_floor: 0)"
            )
        kwargs = self.lr_scheduler_kwargs if self.lr_scheduler_kwargs is not None else {}
        if not isinstance(kwargs, dict):
            raise ConfigError(f'lr_scheduler_kwargs={kwargs!r} must be a mapping (e.g. {{"num_cycles": 0.5}})')
        floors = {key: kwargs[key] for key in ("min_lr", "min_lr_rate") if kwargs.get(key) is not None}
        if floors and floors != {"min_lr_rate": self.lr_floor}:
            raise ConfigError(
                f"lr_floor={self.lr_floor} and lr_scheduler_kwargs {floors} both set the schedule's floor; keep one "
                "(lr_floor is min_lr_rate, a share of learning_rate)"
            )
        self.lr_scheduler_kwargs = {**kwargs, "min_lr_rate": self.lr_floor}
        if schedule == "cosine":
            self.lr_scheduler_type = SchedulerType.COSINE_WITH_MIN_LR

    def _check_report_to(self) -> None:
        """Refuse an unknown ``report_to`` at parse (transformers raises it when the Trainer is built)."""
        try:
            from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
        except ImportError:  # a transformers layout we do not know: leave the check to the Trainer
            return
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        unknown = [name for name in names if name not in INTEGRATION_TO_CALLBACK and name not in ("all", "none")]
        if unknown:
            raise ConfigError(
                f"report_to={', '.join(map(repr, unknown))} is not a logging integration; choose from "
                f"{', '.join(INTEGRATION_TO_CALLBACK)}, 'all' or 'none' (TensorBoard: report_to tensorboard)"
            )

    @property
    def uses_subnets(self) -> bool:
        """Whether training runs sub-network passes at all (K > 0 or sandwich, and lambda > 0)."""
        return (self.num_subnets > 0 or self.sandwich) and self.kl_coef > 0


def _finite_float(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


@dataclass
class ModelArguments:
    """Which model to train: a pretrained checkpoint, or a model type built from a config."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A local directory or hub name of a pretrained image classifier (safetensors weights)."},
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Build a new model of this type from a config, e.g. 'cifar_resnet' or 'resnet'."},
    )
    model_config: dict | str | None = field(
        default=None,
        metadata={"help": 'Config fields for model_type (YAML mapping or JSON), e.g. {"depth": 56}.'},
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache hub downloads."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Allow a classifier head of another size (fine-tuning on new classes)."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.model_config, str):
            try:
                self.model_config = json.loads(self.model_config)
            except json.JSONDecodeError as err:
                raise ConfigError(
                    f"model_config={self.model_config!r} is not valid JSON ({err.msg}); write e.g. '{{\"depth\": 56}}'"
                ) from None
        if self.model_config is not None and not isinstance(self.model_config, dict):
            raise ConfigError(f"model_config={self.model_config!r} must be a mapping of config fields")
        if (self.model_name_or_path is None) == (self.model_type is None):
            raise ConfigError(
                "give exactly one of model_name_or_path (a pretrained model) and model_type (a new model from a "
                f"config); got model_name_or_path={self.model_name_or_path!r}, model_type={self.model_type!r}"
            )

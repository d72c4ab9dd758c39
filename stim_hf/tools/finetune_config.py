"""Settings of ``stim-hf finetune``: fine-tuning an exported sub-network towards the full network it came from.

The defaults are the fine-tuning's own, not the training recipe's (``--config RECIPE.yaml`` gives
the data, the seed, the weight decay, the data loader workers and the BatchNorm re-estimation
count): docs/commands.md, "Fine-tuning an export", says why each is what it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stim_hf.errors import ConfigError
from stim_hf.tools.hub import check_push_to_hub

# Where the KL is taken: the softmax at this temperature (T^2 * KL, as the trainer's sub-network KL).
DEFAULT_TEMPERATURE = 1.0


@dataclass
class FinetuneArguments:
    """Settings of ``stim-hf finetune`` (the data come from :class:`~stim_hf.data.DataArguments`).

    Parameters that control the teacher and where the result goes:
        teacher, output, overwrite, push_to_hub
    Parameters that control the loss:
        ce_weight, kl_temperature
    Parameters that control training:
        epochs, learning_rate, batch_size, weight_decay, optim, optim_args, lr_scheduler_type,
        warmup_steps, seed, device, num_workers, logging_steps
    Parameters that control the end of the run:
        recalibrate_bn, eval_batch_size
    """

    # The teacher and where the result goes
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "The full network to learn from (a saved model folder). Default: the checkpoint the export was "
            "made from, as its export_info.json records it ('source')."
        },
    )
    output: str | None = field(
        default=None,
        metadata={
            "help": "Write the fine-tuned model to this folder and keep the export as it is. Default: the export "
            "folder itself, replaced file by file once the fine-tuned model is complete."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace the model in an --output folder that exists and is not empty (never a checkpoint)."},
    )
    push_to_hub: str | None = field(
        default=None,
        metadata={
            "help": "Upload the fine-tuned folder to this Hub model repository (NAME or OWNER/NAME); checked before "
            "anything else."
        },
    )

    # The loss
    ce_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the cross-entropy with the labels added to the KL from the teacher (default 0: KL "
            "only, as stimulative training trains its sub-networks)."
        },
    )
    kl_temperature: float = field(
        default=DEFAULT_TEMPERATURE,
        metadata={"help": "Temperature T of the KL(teacher || student) on the softmax; the KL is multiplied by T^2."},
    )

    # Training
    epochs: int | None = field(
        default=None, metadata={"help": "Epochs of fine-tuning over the training data (required, >= 1)."}
    )
    learning_rate: float = field(
        default=0.01,
        metadata={"help": "Peak learning rate, cosine to 0 (a tenth of the CIFAR recipes' training rate)."},
    )
    batch_size: int = field(default=128, metadata={"help": "Training batch size (images per step)."})
    weight_decay: float = field(
        default=5.0e-4, metadata={"help": "Weight decay (the CIFAR recipes'; --config takes the recipe's)."}
    )
    optim: str = field(default="sgd", metadata={"help": "Optimizer, as TrainingArguments' optim."})
    optim_args: str | None = field(
        default="momentum=0.9,nesterov=true", metadata={"help": "Optimizer arguments, as TrainingArguments'."}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0, metadata={"help": "Warm-up steps (or a share of the run below 1); 0: none."})
    seed: int = field(
        default=42,
        metadata={
            "help": "Seed of the batches, of the re-estimation images and of the validation split carved off the "
            "training data (use the training run's: --config takes it from the recipe)."
        },
    )
    device: str | None = field(
        default=None, metadata={"help": "'cpu' or 'cuda' (default: cuda if available, else cpu)."}
    )
    num_workers: int = field(default=0, metadata={"help": "Data loader worker processes."})
    logging_steps: float = field(default=50, metadata={"help": "Log the training loss every this many steps."})

    # The end of the run
    recalibrate_bn: int | None = field(
        default=None,
        metadata={
            "help": "Re-estimate the fine-tuned model's BatchNorm statistics at its input size on this many training "
            "images (default: 1024; 0 keeps the running estimates of fine-tuning)."
        },
    )
    eval_batch_size: int = field(default=256, metadata={"help": "Batch size of the before / after evaluations."})

    config: str | None = field(
        default=None,
        metadata={
            "help": "The training recipe (YAML): its data fields, seed, weight_decay, dataloader_num_workers and "
            "subnet_bn_recalibration_samples become defaults."
        },
    )

    def __post_init__(self) -> None:
        if self.epochs is None:
            raise ConfigError(
                "stim-hf finetune needs --epochs N (N >= 1), e.g. 'stim-hf finetune exported/ --epochs 25 --config "
                "RECIPE.yaml'"
            )
        _check_integer("--epochs", self.epochs, 1, "epochs of fine-tuning")
        _check_integer("--batch-size", self.batch_size, 1, "images per batch")
        _check_integer("--eval-batch-size", self.eval_batch_size, 1, "images per batch")
        if self.recalibrate_bn is not None:
            _check_integer("--recalibrate-bn", self.recalibrate_bn, 0, "training images; 0 keeps fine-tuning's")
        _check_number("--ce-weight", self.ce_weight, "[0, inf)", lambda v: v >= 0)
        _check_number("--kl-temperature", self.kl_temperature, "(0, inf)", lambda v: v > 0)
        if self.device is not None and self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r} is not known; give cpu or cuda (or leave it out)")
        if self.push_to_hub is not None:
            check_push_to_hub(self.push_to_hub)


def _check_integer(flag: str, value: object, minimum: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag} {value!r} must be an integer >= {minimum} ({what})")


def _check_number(flag: str, value: object, valid: str, ok) -> None:  # noqa: ANN001
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{flag} {value!r} is out of range; valid: {valid}")

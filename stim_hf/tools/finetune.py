"""Fine-tuning an exported sub-network towards the full network it came from: ``stim-hf finetune``.

``finetune_export(EXPORT_DIR, data_args, FinetuneArguments(epochs=N))`` trains the export (the
student) with ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` from the frozen full network
it was exported from (the teacher: the checkpoint its ``export_info.json`` names, in eval mode, on
the full-size batch, no gradient), plus ``ce_weight`` times the cross-entropy with the labels if
asked; the student sees the batch resized bilinearly to its input size, as training resizes
sub-network inputs. It runs through :class:`~stim_hf.training.reliable_trainer.ReliableTrainer`
(the non-finite loss guard, safetensors only) with a short cosine schedule, then re-estimates the
student's BatchNorm statistics at its input size, measures it before and after on the validation
split, and writes the folder back: the whole folder is written to a staging folder first, sealed
with a manifest of its files' sizes and hashes, and its files then replace the export's, each with
one rename, so the export stays loadable whenever the run stops (a failed write: one
:class:`~stim_hf.errors.StorageError` line, the export as it was). ``export_info.json`` gains a
``finetune`` record and the model card says what was done and what it gave. OFA fine-tunes its
sub-networks the same way (+0.4 / +0.9 top-1 points after 25 / 75 epochs in its paper).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, TrainerCallback

from stim_hf.analysis.evaluation import BatchSource, evaluate_model, recalibration_batches
from stim_hf.data.image_datasets import DataArguments, get_label_names, load_image_datasets
from stim_hf.data.transforms import collate_image_batch, with_image_transforms
from stim_hf.errors import ConfigError, ModelStructureError
from stim_hf.method import find_residual_family, resize_input
from stim_hf.method.batchnorm import DEFAULT_RECALIBRATION_SAMPLES, recalibrate_batchnorm
from stim_hf.method.losses import kl_divergence
from stim_hf.tools.datasets_progress import datasets_work_in_lines
from stim_hf.tools.export import push_export, write_export_record
from stim_hf.tools.finetune_config import FinetuneArguments
from stim_hf.tools.model_cards import describe_data
from stim_hf.tools.output_folders import check_new_folder
from stim_hf.tools.trainer_progress import use_line_progress_in_logs
from stim_hf.training.checkpointing import publish_files
from stim_hf.training.config import StimulativeTrainingArguments
from stim_hf.training.integrity import MANIFEST_NAMES, write_folder_manifest
from stim_hf.training.modeling import check_saved_model_dir, load_saved_classifier, without_transformers_progress_bars
from stim_hf.training.reliable_trainer import ReliableTrainer
from stim_hf.training.write_failures import reported_write_failures

logger = logging.getLogger(__name__)

EXPORT_RECORD = "export_info.json"
# Keys of export_info.json that fine-tuning reads.
_RECORD_KEYS = ("source", "family", "model_class", "depths", "full_depths", "input_size")
# Weight files a fine-tuned folder replaces (a sharded export leaves no stale shard behind).
_WEIGHT_PATTERNS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")


@dataclass
class FinetuneResult:
    """What :func:`finetune_export` did: the fine-tuned model (eval mode), where it went, and its record."""

    model: PreTrainedModel
    output_dir: Path
    record: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class FinetuneTrainer(ReliableTrainer):
    """A ``ReliableTrainer`` that distils a frozen teacher into ``model``: KL on the logits, optionally plus CE.

    The teacher runs in eval mode under ``no_grad`` on the batch as it comes; the model (the
    student) on the batch resized to ``input_size``. Held beside the model, not inside it: the
    Trainer optimises, moves and saves the student alone.
    """

    # compute_loss returns a per-micro-batch mean (DESIGN.md 3: the Trainer guesses wrong for **kwargs forwards).
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        args: StimulativeTrainingArguments,
        input_size: int | None = None,
        ce_weight: float = 0.0,
        temperature: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.input_size, self.ce_weight, self.temperature = input_size, ce_weight, temperature
        self._micro_step_key = (-1, 0)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """``KL(teacher || student) + ce_weight * CE`` in training; the student's CE outside it."""
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        outputs = model(pixel_values=resize_input(pixel_values, self.input_size))
        if not model.training:
            ce = F.cross_entropy(outputs.logits.float(), labels)
            return (ce, outputs) if return_outputs else ce
        with torch.no_grad():
            teacher_logits = self.teacher(pixel_values=pixel_values).logits
        loss = kl_divergence(teacher_logits, outputs.logits, self.temperature)
        terms = [("kl_to_teacher", loss, None)]
        if self.ce_weight:
            ce = F.cross_entropy(outputs.logits.float(), labels)
            terms.append(("student_ce_loss", ce, None))
            loss = loss + self.ce_weight * ce
        step, seen = self._micro_step_key
        if step != self.state.global_step:
            step, seen = self.state.global_step, 0
        self._micro_step_key = (step, seen + 1)
        self.note_loss_terms(step, seen, terms, labels)
        return (loss, outputs) if return_outputs else loss


# --------------------------------------------------------------------------------------------------
# Checks made before anything is loaded
# --------------------------------------------------------------------------------------------------


def read_export_record(export_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``export_info.json`` of an export folder; a :class:`ConfigError` for a folder that is no export."""
    folder = Path(export_dir)
    if not folder.is_dir():
        reason = "is a file" if folder.exists() else "does not exist"
        raise ConfigError(f"'{export_dir}' {reason}; give the folder that stim-hf export (or search --export) wrote")
    path = folder / EXPORT_RECORD
    if not path.is_file():
        raise ConfigError(
            f"'{export_dir}' is not a stim-hf export (it has no {EXPORT_RECORD}, the record of the full network it "
            "came from); export a sub-network first ('stim-hf export CHECKPOINT --depths ... --output DIR') and "
            "fine-tune that folder"
        )
    check_saved_model_dir(folder, f"export folder '{export_dir}'")  # its files as written, the record included
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"'{path}' is unreadable ({error}); export the sub-network again") from None
    missing = [key for key in _RECORD_KEYS if not isinstance(info, dict) or key not in info]
    if missing:
        raise ConfigError(f"'{path}' lacks {', '.join(missing)}; export the sub-network again")
    return info


def resolve_teacher(info: dict[str, Any], teacher: str | os.PathLike | None = None) -> str:
    """The folder of the full network to learn from: ``teacher``, else the export's recorded source.

    A :class:`ConfigError` naming the path and the fix when it is not there.
    """
    if teacher is not None:
        check_saved_model_dir(teacher, f"--teacher '{teacher}'")
        return str(teacher)
    source = str(info["source"])
    if os.path.isdir(os.path.expanduser(source)):
        check_saved_model_dir(source, f"the export's source checkpoint '{source}'")
        return os.path.expanduser(source)
    where = (
        "a model that was in memory, not a folder"
        if source.startswith("an in-memory ")
        else f"not a folder here (relative paths start from {os.getcwd()})"
    )
    hub = info.get("base_model")
    download = f" (download it first: 'hf download {hub} --local-dir DIR')" if hub else ""
    raise ConfigError(
        f"the full network this export came from, '{source}' ({EXPORT_RECORD}'s source), is {where}; fine-tuning "
        f"learns from it: give it with --teacher PATH{download}, the checkpoint or training output the export was "
        "made from"
    )


def check_teacher(teacher: PreTrainedModel, student: PreTrainedModel, info: dict[str, Any], path: str) -> None:
    """Refuse a teacher that is not the full network of this export (family, blocks per stage, classes)."""
    try:
        family, stages = find_residual_family(teacher)
    except ModelStructureError:
        family, stages = None, []
    blocks = [s.num_blocks for s in stages]
    problems = []
    if type(teacher).__name__ != info["model_class"] or (family and family.name != info["family"]):
        problems.append(f"it is a {type(teacher).__name__}, the export a {info['model_class']} ({info['family']})")
    elif blocks != list(info["full_depths"]):
        problems.append(f"its stages hold {blocks} blocks, the export's full network {list(info['full_depths'])}")
    if teacher.config.num_labels != student.config.num_labels:
        problems.append(f"it has {teacher.config.num_labels} classes, the export {student.config.num_labels}")
    if problems:
        raise ConfigError(
            f"teacher '{path}' is not the full network this export came from: {'; '.join(problems)}; give the "
            "checkpoint the export was made from with --teacher PATH"
        )


def training_arguments(args: FinetuneArguments, run_dir: str | os.PathLike) -> StimulativeTrainingArguments:
    """The Trainer's arguments of a fine-tuning run (checked as a training run's are: one-line errors)."""
    use_cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    return StimulativeTrainingArguments(
        output_dir=str(run_dir),
        stim_method="ct",
        num_eval_subnets=0,
        subnet_bn_recalibration_samples=0,
        on_collapse="ignore",
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        optim=args.optim,
        optim_args=args.optim_args,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        use_cpu=use_cpu,
        dataloader_num_workers=args.num_workers,
        logging_steps=args.logging_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
    )


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_logits(
    teacher: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | str
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The teacher's logits (float32, on the CPU) for each batch, in eval mode, and all the labels."""
    teacher.eval()
    logits, labels = [], []
    for batch in batches:
        logits.append(teacher(pixel_values=batch["pixel_values"].to(device)).logits.float().cpu())
        labels.append(batch["labels"])
    return logits, torch.cat(labels)


@torch.no_grad()
def kl_to_teacher(
    student: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    logits: Sequence[torch.Tensor],
    input_size: int | None,
    temperature: float = 1.0,
) -> float:
    """Mean ``T^2 * KL(teacher || student)`` over ``batches``, the student in eval mode on them resized to ``input_size``."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    try:
        for batch, reference in zip(batches, logits, strict=True):
            student_logits = student(pixel_values=resize_input(batch["pixel_values"].to(device), input_size)).logits
            n = reference.shape[0]
            total += float(kl_divergence(reference.to(device), student_logits, temperature)) * n
            count += n
    finally:
        student.train(was_training)
    return total / max(count, 1)


class _Validation:
    """The validation split, ready for the measures before and after: teacher logits kept, images re-decoded."""

    def __init__(  # noqa: ANN001
        self,
        split,
        data_args: DataArguments,
        args: FinetuneArguments,
        input_size: int | None,
        teacher: nn.Module,
        device: torch.device | str,
        resized_by_model: bool = False,
    ) -> None:
        self.full = BatchSource(with_image_transforms(split, data_args, train=False), args.eval_batch_size, cache=False)
        if resized_by_model:  # the student resizes the evaluation crop itself, as pipeline() runs it
            self.own = self.full
        else:
            own = with_image_transforms(split, data_args, train=False, input_size=input_size)
            self.own = BatchSource(own, args.eval_batch_size, cache=False)
        self.input_size, self.temperature = input_size, args.kl_temperature
        self.logits, labels = teacher_logits(teacher, self.full, device)
        self.teacher_metrics = _accuracies(torch.cat(self.logits), labels)

    def measure(self, student: nn.Module) -> dict[str, float]:
        """Top-1 / top-5 of ``student`` at its processor's input and its KL to the teacher (resized batches)."""
        metrics = evaluate_model(student, self.own)
        return {
            "accuracy": metrics["accuracy"],
            "top5_accuracy": metrics["top5_accuracy"],
            "num_samples": metrics["num_samples"],
            "kl_to_teacher": kl_to_teacher(student, self.full, self.logits, self.input_size, self.temperature),
        }


def _accuracies(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    count = int(labels.shape[0])
    return {
        "accuracy": int((top[:, 0] == labels).sum()) / count,
        "top5_accuracy": int((top == labels[:, None]).any(dim=-1).sum()) / count,
        "num_samples": count,
    }


# --------------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------------


def finetune_export(
    export_dir: str | os.PathLike,
    data_args: DataArguments,
    args: FinetuneArguments,
    callbacks: Sequence[TrainerCallback] = (),
    command: str | None = None,
) -> FinetuneResult:
    """Fine-tune the exported sub-network in ``export_dir`` towards its full network; write the folder back.

    ``data_args`` give the training images (and the validation split, carved off them with
    ``args.seed`` when there is none: the training run's seed keeps it the same held-out split).
    Everything that can be refused is refused before any model is loaded: a folder that is no export,
    a teacher that is gone, settings out of range, no training data (:class:`ConfigError`, one line).
    The result replaces the export (``args.output`` unset) or goes to ``args.output``; a run that
    stops on an error leaves the export as it was. ``callbacks`` go to the Trainer.
    """
    started = time.perf_counter()
    if not isinstance(args, FinetuneArguments):
        raise ConfigError(f"finetune_export needs FinetuneArguments, got {type(args).__name__}")
    if data_args is None or not data_args.has_training_source:
        raise ConfigError(
            "stim-hf finetune needs training images: give --config RECIPE.yaml (the training recipe's data) or "
            "--dataset_name, --train_file or --train_dir"
        )
    info = read_export_record(export_dir)
    source = Path(export_dir)
    target = Path(args.output) if args.output is not None else source
    in_place = target.resolve() == source.resolve()
    if not in_place:
        check_new_folder(target, "--output", args.overwrite, replaced="the model in it")
    teacher_path = resolve_teacher(info, args.teacher)
    if Path(teacher_path).resolve() in (source.resolve(), target.resolve()):
        raise ConfigError(
            f"the teacher '{teacher_path}' is the folder being fine-tuned or written; give the full network the "
            "export came from with --teacher PATH"
        )
    work = target.parent / f".{target.name}.finetune"
    run_dir = work / "run"
    training_args = training_arguments(args, run_dir)  # the Trainer's checks: one line, before anything loads

    student = load_saved_classifier(source, f"export folder '{export_dir}'")
    teacher = load_saved_classifier(teacher_path, f"teacher '{teacher_path}'")
    check_teacher(teacher, student, info, teacher_path)
    with datasets_work_in_lines("loading the images"):
        splits = load_image_datasets(data_args, seed=args.seed)
    classes = len(get_label_names(splits["train"], data_args.label_column_name))
    if classes != student.config.num_labels:
        raise ConfigError(
            f"the training data have {classes} classes and the export {student.config.num_labels}; give the data "
            "the model was trained on (--config RECIPE.yaml)"
        )
    device = training_args.device
    student.to(device)
    teacher.to(device).eval().requires_grad_(False)
    input_size = info.get("input_size")
    resized_by_model = info.get("input_resized_by") == "model"
    validation = _Validation(splits["validation"], data_args, args, input_size, teacher, device, resized_by_model)
    before = validation.measure(student)
    logger.info("before fine-tuning: top-1 %.2f%%", 100 * before["accuracy"])

    if work.exists():
        logger.warning("removing '%s', left by an earlier fine-tuning run that stopped", work)
        shutil.rmtree(work)
    try:
        trainer = FinetuneTrainer(
            model=student,
            teacher=teacher,
            args=training_args,
            input_size=input_size,
            ce_weight=args.ce_weight,
            temperature=args.kl_temperature,
            train_dataset=with_image_transforms(splits["train"], data_args, train=True),
            data_collator=collate_image_batch,
            callbacks=list(callbacks),
        )
        use_line_progress_in_logs(trainer)
        trained = trainer.train()
        student = trainer.model.eval()
        recalibrated = _reestimate_batchnorm(student, splits["train"], data_args, args, input_size)
        after = validation.measure(student)
        logger.info("after fine-tuning: top-1 %.2f%%", 100 * after["accuracy"])
        if in_place and after["accuracy"] < before["accuracy"]:
            logger.warning(
                "top-1 fell from %.2f%% to %.2f%%; the fine-tuned model replaces the export all the same (give "
                "--output to keep both, or a smaller --learning-rate)",
                100 * before["accuracy"],
                100 * after["accuracy"],
            )
        record = {
            "epochs": args.epochs,
            "steps": trainer.state.global_step,
            "train_samples": len(splits["train"]),
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": args.lr_scheduler_type,
            "warmup_steps": args.warmup_steps,
            "optim": args.optim,
            "optim_args": args.optim_args,
            "weight_decay": args.weight_decay,
            "batch_size": args.batch_size,
            "loss": describe_loss(args.ce_weight, args.kl_temperature),
            "ce_weight": args.ce_weight,
            "kl_temperature": args.kl_temperature,
            "teacher": teacher_path,
            "teacher_input_size": data_args.image_size,
            "input_size": input_size,
            "train_loss": trained.training_loss,
            "bn_recalibration_samples": recalibrated,
            "seed": args.seed,
            "before": before,
            "after": after,
            "teacher_metrics": validation.teacher_metrics,
            "train_seconds": trained.metrics.get("train_runtime"),
            "seconds": None,  # filled in below, once the folder is written
            "command": command,
        }
        info = updated_record(info, record, data_args, args.seed)
        record["seconds"] = round(time.perf_counter() - started, 1)
        kept = f"the export '{source}' is as it was" + ("" if in_place else f", and nothing was written to '{target}'")
        with reported_write_failures(
            "the fine-tuned model", str(target), partial=(str(work / "model"),), intact=lambda: kept, flag="--output"
        ):
            _write_folder(source, target, student, info, work, in_place)
    except BaseException:
        _clean_up(work, run_dir)
        raise
    shutil.rmtree(work, ignore_errors=True)
    logger.info("fine-tuned %s: written to %s", export_dir, target)
    if args.push_to_hub is not None:
        push_export(target, args.push_to_hub)
    return FinetuneResult(student, target, record)


def describe_loss(ce_weight: float, temperature: float) -> str:
    """The loss in words, as the record and the card give it."""
    kl = "KL(teacher || student)" + (f" at temperature {temperature:g} (times T^2)" if temperature != 1 else "")
    return kl + (f" + {ce_weight:g} * cross-entropy with the labels" if ce_weight else "")


def updated_record(info: dict[str, Any], record: dict[str, Any], data_args: DataArguments, seed: int) -> dict[str, Any]:
    """``export_info.json`` after fine-tuning: the ``finetune`` record (earlier ones kept in it), the accuracies now."""
    info = dict(info)
    earlier = info.pop("finetune", None)
    if earlier is not None:
        record["earlier"] = [*earlier.pop("earlier", []), earlier]
    info["finetune"] = record
    info["data"] = describe_data(data_args, seed)
    info["metrics"] = {k: record["after"][k] for k in ("accuracy", "top5_accuracy", "num_samples")}
    info["full_metrics"] = dict(record["teacher_metrics"])
    info["bn_recalibration_samples"] = record["bn_recalibration_samples"]
    info["seed"] = seed
    return info


def _reestimate_batchnorm(student, train_split, data_args, args: FinetuneArguments, input_size) -> int:  # noqa: ANN001
    """Re-estimate the student's BatchNorm statistics at its input size, as export does; the images used."""
    count = DEFAULT_RECALIBRATION_SAMPLES if args.recalibrate_bn is None else args.recalibrate_bn
    if not count:
        return 0
    batches = recalibration_batches(train_split, data_args, count, args.seed, args.eval_batch_size, input_size)
    device = next(student.parameters()).device
    moved = ({"pixel_values": batch["pixel_values"].to(device)} for batch in batches)
    return recalibrate_batchnorm(student, moved, count)


def _write_folder(
    source: Path, target: Path, student: PreTrainedModel, info: dict[str, Any], work: Path, in_place: bool
) -> None:
    """Write the fine-tuned folder to ``work/model``, seal it with its manifest (sizes, hashes), then put it in place.

    See :func:`finetune_export`.
    """
    staged = work / "model"
    staged.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and not any(path.match(pattern) for pattern in (*_WEIGHT_PATTERNS, *MANIFEST_NAMES)):
            shutil.copy2(path, staged / path.name)
    with without_transformers_progress_bars():
        student.save_pretrained(staged)
    write_export_record(staged, info)
    write_folder_manifest(staged)
    new_files = {path.name for path in staged.iterdir()}
    if in_place:
        publish_files(str(staged), str(target))  # each file one rename, the weights last
        for pattern in _WEIGHT_PATTERNS:  # a stale shard or index of an earlier save
            for path in target.glob(pattern):
                if path.name not in new_files:
                    path.unlink()
    elif not target.exists() or not any(target.iterdir()):
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)  # one rename (onto an empty folder, too)
    else:  # --overwrite: the old folder goes aside, the new one takes its name, the old one is removed
        aside = work / "replaced"
        os.replace(target, aside)
        os.replace(staged, target)
        shutil.rmtree(aside, ignore_errors=True)


def _clean_up(work: Path, run_dir: Path) -> None:
    """After a failed run: remove the staged model; keep the run folder only when it holds something (a dump)."""
    shutil.rmtree(work / "model", ignore_errors=True)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        logger.warning("the fine-tuning run's files are kept in '%s'", run_dir)
        return
    shutil.rmtree(work, ignore_errors=True)

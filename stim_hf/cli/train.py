"""The training job behind ``scripts/train.py`` and ``stim-hf train``."""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import datasets
import transformers
from accelerate import PartialState
from transformers import set_seed

from stim_hf.data.device_augmentation import DeviceImageAugmentation
from stim_hf.data.device_color import with_uint8_transforms
from stim_hf.data.image_datasets import DataArguments, get_label_names, load_image_datasets
from stim_hf.data.predecoded import with_predecoded_transforms
from stim_hf.data.transforms import build_image_processor, collate_image_batch, with_image_transforms
from stim_hf.errors import ConfigError
from stim_hf.tools.datasets_progress import datasets_work_in_lines
from stim_hf.tools.hub import push_folder
from stim_hf.tools.model_cards import CARD_NAME, hub_base_model, training_card, write_card
from stim_hf.tools.trainer_progress import use_line_progress_in_logs
from stim_hf.training.callbacks import log_subnet_report
from stim_hf.training.checkpointing import resolve_resume_checkpoint as resolve_checkpoint
from stim_hf.training.config import ModelArguments, StimulativeTrainingArguments
from stim_hf.training.metrics import build_compute_metrics, top_k_indices
from stim_hf.training.model_setup import method_structures, refuse_zero_init_of_pretrained
from stim_hf.training.modeling import build_model, check_saved_model_dir
from stim_hf.training.parser import StimArgumentParser
from stim_hf.training.trainer import StimulativeTrainer

logger = logging.getLogger("stim_hf.cli.train")


def parse_train_args(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, StimulativeTrainingArguments]:
    """Parse ``[CONFIG.yaml] [--field value ...]`` into the three argument dataclasses."""
    parser = StimArgumentParser((ModelArguments, DataArguments, StimulativeTrainingArguments))
    return parser.parse_args_and_config(argv)


def resolve_resume_checkpoint(training_args: StimulativeTrainingArguments) -> str | None:
    """Turn ``resume_from_checkpoint`` (``true``, a path, or unset) into a checkpoint path or None.

    ``true`` takes the last *complete* checkpoint in ``output_dir`` (incomplete newer ones, left by
    a crash during a write, are skipped with a warning); a path must be a complete checkpoint.
    See :func:`stim_hf.training.checkpointing.resolve_resume_checkpoint`.
    """
    output_dir = training_args.output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"output_dir='{output_dir}' is a file, not a directory; give a directory for the run")
    return resolve_checkpoint(training_args.resume_from_checkpoint, output_dir)


def check_model_source(model_args: ModelArguments) -> None:
    """Refuse a local ``model_name_or_path`` that cannot be loaded, before any data is loaded.

    A path that does not exist, a folder without ``config.json``, or one whose weights are not
    safetensors (``pytorch_model.bin`` is a pickle, and stim_hf never unpickles) is a
    :class:`ConfigError`. Hub names are left to ``from_pretrained``.
    """
    source = model_args.model_name_or_path
    if source is None:
        return
    path = os.path.expanduser(source)
    looks_local = os.path.exists(path) or source.startswith((".", "/", "~")) or source.count("/") > 1
    if not looks_local:
        return
    check_saved_model_dir(path, f"model_name_or_path='{source}'")


def with_pipeline_transforms(dataset: datasets.Dataset, data_args: DataArguments, train: bool) -> datasets.Dataset:
    """``dataset`` ready for the Trainer through ``data_args.image_pipeline`` ('pil', 'predecoded', 'device_color')."""
    if data_args.image_pipeline == "predecoded":
        return with_predecoded_transforms(dataset, data_args, train, num_proc=data_args.preprocessing_num_workers)
    if data_args.image_pipeline == "device_color":
        return with_uint8_transforms(dataset, data_args, train)
    return with_image_transforms(dataset, data_args, train)


def pipeline_batch_transform(data_args: DataArguments) -> DeviceImageAugmentation | None:
    """The trainer's ``batch_transform`` that finishes the configured pipeline on the device (None for 'pil')."""
    return DeviceImageAugmentation.from_data_args(data_args) if data_args.image_pipeline != "pil" else None


def run_training(
    model_args: ModelArguments, data_args: DataArguments, training_args: StimulativeTrainingArguments
) -> dict[str, Any]:
    """Train, save and evaluate a model as configured; returns the metrics of ``all_results.json``.

    Leaves in ``output_dir`` the model (safetensors; with its code where transformers does not ship
    the class) with its image processor (``preprocessor_config.json``, the evaluation's
    preprocessing), a model card ``README.md`` (after training), the Trainer's ``*_results.json``,
    ``trainer_state.json`` and, when ``report_to`` includes tensorboard, the event files (with the
    final sub-network report: :func:`~stim_hf.training.callbacks.log_subnet_report`).
    """
    _setup_logging(training_args)
    set_seed(training_args.seed)
    resume = resolve_resume_checkpoint(training_args)
    check_model_source(model_args)
    if training_args.zero_init_residual and model_args.model_name_or_path is not None:
        raise refuse_zero_init_of_pretrained(model_args.model_name_or_path)  # before any data is loaded

    with datasets_work_in_lines("loading the images"):
        splits = load_image_datasets(data_args, seed=training_args.seed)
    label_names = get_label_names(splits["train"], data_args.label_column_name)
    try:
        model = build_model(model_args, label_names)
    except OSError as error:  # transformers' "not a local folder and not a valid model identifier", offline, ...
        raise ConfigError(
            f"cannot load model_name_or_path='{model_args.model_name_or_path}': {error}; give a local directory "
            "with config.json and model.safetensors, or a hub model name (in the HF cache when offline)"
        ) from error

    method_structures(model, training_args)  # a model / method misfit is reported before any decoding
    # Pre-decoding writes a datasets cache: the main process first, the others then read it.
    with training_args.main_process_first(desc="preparing the image pipeline"):
        # Training images also re-estimate the evaluated sub-networks' BatchNorm statistics.
        needs_train = training_args.do_train or (
            training_args.num_eval_subnets and training_args.subnet_bn_recalibration_samples
        )
        with datasets_work_in_lines(f"preparing the image pipeline ({data_args.image_pipeline})"):
            train_dataset = with_pipeline_transforms(splits["train"], data_args, train=True) if needs_train else None
            eval_dataset = with_pipeline_transforms(splits["validation"], data_args, train=False)
    trainer = StimulativeTrainer(
        model=model,
        args=training_args,
        batch_transform=pipeline_batch_transform(data_args),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate_image_batch,
        compute_metrics=build_compute_metrics(),
        preprocess_logits_for_metrics=top_k_indices,
        # Saved beside every model it writes: pipeline("image-classification") preprocesses as evaluation does.
        processing_class=build_image_processor(data_args),
    )
    use_line_progress_in_logs(trainer)

    metrics: dict[str, Any] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        trainer.save_state()
        train_metrics = dict(result.metrics, train_samples=len(train_dataset))
        if trainer.collapse_monitor.reports:
            train_metrics["collapse"] = trainer.collapse_monitor.reports[0]
        if trainer.collapse_monitor.recovery:
            train_metrics["collapse_recovered"] = trainer.collapse_monitor.recovery
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        metrics.update(train_metrics)

    eval_metrics = trainer.evaluate()
    subnet_results = trainer.evaluate_subnets() if training_args.num_eval_subnets else []
    if subnet_results:
        eval_metrics.update(subnet_summary(subnet_results))
    eval_metrics["eval_samples"] = len(eval_dataset)
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    metrics.update(eval_metrics)
    if subnet_results:
        metrics["subnets"] = subnet_results
        if trainer.is_world_process_zero():
            print(format_subnet_table(eval_metrics, subnet_results), flush=True)
        log_subnet_report(trainer, eval_metrics, subnet_results)  # the same figures, and the loafing plot
    if training_args.do_train and trainer.is_world_process_zero():
        write_model_card(trainer, model_args, data_args, eval_metrics, subnet_results)
    return metrics


def write_model_card(
    trainer: StimulativeTrainer,
    model_args: ModelArguments,
    data_args: DataArguments,
    eval_metrics: dict[str, Any],
    subnet_results: list[dict[str, Any]],
) -> None:
    """Write ``output_dir/README.md``, the Hub model card of the trained model, from the final evaluation.

    Why after it: the card's ``model-index`` holds the accuracies just measured, and no others.
    With ``push_to_hub`` the card is uploaded too (the Trainer pushed the model, with its own
    card, when it saved it).
    """
    args = trainer.args
    training = {"stim_method": args.stim_method, "num_subnets": args.num_subnets, "seed": args.seed}
    model = trainer.model
    text = training_card(
        args.output_dir, type(model).__name__, data_args, training, eval_metrics, subnet_results,
        base_model=hub_base_model(model_args.model_name_or_path),
    )  # fmt: skip
    write_card(args.output_dir, text)
    repo_id = getattr(trainer, "hub_model_id", None) if args.push_to_hub else None  # set by the Trainer's init_hf_repo
    if repo_id:
        push_folder(args.output_dir, repo_id, "Model card", token=args.hub_token, files=[CARD_NAME])


def subnet_summary(subnet_results: list[dict[str, Any]]) -> dict[str, Any]:
    """``eval_subnet_accuracy_mean`` / ``_min`` / ``_max`` over ``evaluate_subnets`` results, and the same
    with the full network's BatchNorm statistics (``..._inherited_bn``), plus the images they were re-estimated on."""
    summary: dict[str, Any] = {}
    for suffix in ("", "_inherited_bn"):
        accuracies = [r[f"accuracy{suffix}"] for r in subnet_results]
        summary[f"eval_subnet_accuracy_mean{suffix}"] = sum(accuracies) / len(accuracies)
        summary[f"eval_subnet_accuracy_min{suffix}"] = min(accuracies)
        summary[f"eval_subnet_accuracy_max{suffix}"] = max(accuracies)
    summary["eval_subnet_bn_recalibration_samples"] = subnet_results[0]["bn_recalibration_samples"]
    return summary


def format_subnet_table(eval_metrics: dict[str, Any], subnet_results: list[dict[str, Any]]) -> str:
    """The end-of-training printout: the full network, each sub-network and their mean (top-1)."""
    samples = subnet_results[0]["bn_recalibration_samples"]
    lines = [f"full network: top-1 {100 * eval_metrics['eval_accuracy']:.2f}%"]
    if samples:
        lines.append(f"sub-networks, BatchNorm statistics re-estimated for each on {samples} training images")
        lines.append("(inherited: with the full network's statistics, the papers' loafing measure):")
    else:
        lines.append("sub-networks, with the full network's BatchNorm statistics (inherited):")

    def cells(accuracy: float, inherited: float) -> str:
        return f"top-1 {100 * accuracy:.2f}%" + (f"   inherited {100 * inherited:.2f}%" if samples else "")

    for r in subnet_results:
        lines.append(
            f"  depths={','.join(map(str, r['depths']))} ({100 * r['depth_fraction']:.0f}% of blocks): "
            + cells(r["accuracy"], r["accuracy_inherited_bn"])
        )
    lines.append(
        f"mean of {len(subnet_results)} sub-networks: "
        + cells(eval_metrics["eval_subnet_accuracy_mean"], eval_metrics["eval_subnet_accuracy_mean_inherited_bn"])
    )
    return "\n".join(lines)


def _setup_logging(training_args: StimulativeTrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    logging.getLogger("stim_hf").setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse arguments and run the training job (entry point of ``scripts/train.py``)."""
    metrics = run_training(*parse_train_args(argv))
    end_distributed_run()
    return metrics


def end_distributed_run() -> None:
    """Once every process is done, destroy the process group and join its threads (nothing to do in a
    single process).

    Call it once the trainer is out of reach. ``destroy_process_group`` alone leaves gloo's worker
    threads running while the finished trainer's DDP model still holds the group; a worker that drops
    the last reference to a finished collective while the interpreter shuts down must take the GIL to
    free that collective's tensors, and the process aborts ("terminate called without an active
    exception", SIGABRT; caught in a core dump of tests/test_distributed.py, about 1 launch in 10 to 70).
    Collecting the trainer's reference cycles here destroys the group, which joins its threads first.
    """
    state = PartialState()
    if state.use_distributed:
        state.wait_for_everyone()
        state.destroy_process_group()
        # A worker frees the collective it just finished right after it completes; the pause hands it the GIL for
        # that, so that the join below (which may run with the GIL held) does not wait on a thread waiting for it.
        time.sleep(0.1)
        gc.collect()

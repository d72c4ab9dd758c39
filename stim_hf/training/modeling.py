"""Building the model to train from :class:`~stim_hf.training.config.ModelArguments`, and loading saved models."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedModel
from transformers.utils import logging as hf_logging

from stim_hf.errors import ConfigError
from stim_hf.models import CifarResNetConfigError  # importing it registers the CIFAR ResNets
from stim_hf.training.checkpointing import safetensors_problem
from stim_hf.training.config import ModelArguments
from stim_hf.training.integrity import damage_remedy, folder_problems

SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def build_model(model_args: ModelArguments, label_names: Sequence[str]) -> PreTrainedModel:
    """Create the image classifier to train, with a head for ``label_names``.

    A ``model_type`` builds a new model from ``model_config`` (offline, random weights); a
    ``model_name_or_path`` loads pretrained safetensors weights. Remote code is never trusted.
    """
    label_kwargs = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }
    if model_args.model_type is not None:
        overrides = dict(model_args.model_config or {})
        try:
            config = AutoConfig.for_model(model_args.model_type, **overrides, **label_kwargs)
        except ValueError as err:
            if "Unrecognized model identifier" in str(err) or model_args.model_type in str(err):
                raise ConfigError(
                    f"model_type='{model_args.model_type}' is unknown to transformers and stim_hf; use a "
                    "registered type such as 'cifar_resnet' or 'resnet'"
                ) from None
            if isinstance(err, ConfigError):
                raise
            # A config class's own check (the CIFAR ResNets' is a ValueError, their code needs nothing of stim_hf).
            raise ConfigError(str(err)) from None
        # Configs keep unknown kwargs as attributes: compare with a default config's fields instead.
        known = set(AutoConfig.for_model(model_args.model_type).to_dict())
        unknown = sorted(k for k in overrides if k not in known)
        if unknown:
            raise ConfigError(
                f"model_config has keys {unknown} that {type(config).__name__} does not know; check their spelling"
            )
        return AutoModelForImageClassification.from_config(config)
    return AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        cache_dir=model_args.cache_dir,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        use_safetensors=True,
        trust_remote_code=False,
        **label_kwargs,
    )


def check_saved_model_dir(path: str | os.PathLike, label: str) -> None:
    """Refuse a folder that is not a model saved with ``save_pretrained`` in safetensors.

    ``label`` names the setting in the message (``model_name_or_path='x'``, ``checkpoint 'x'``).
    A missing folder, one without ``config.json``, one whose weights are not safetensors
    (``pytorch_model.bin`` is a pickle, and stim_hf never unpickles), a shard index that names
    other files or missing shards, a truncated safetensors file, or a file that differs from what
    its stim_hf manifest recorded (size or hash; :func:`~stim_hf.training.integrity.folder_problems`,
    the training state of a checkpoint left unread): each is a :class:`ConfigError`.
    """
    path = os.path.expanduser(str(path))
    if not os.path.isdir(path):
        reason = "is a file" if os.path.exists(path) else "does not exist"
        raise ConfigError(
            f"{label} is not a directory ('{path}' {reason}); give a folder saved with save_pretrained "
            f"(config.json + model.safetensors), e.g. a training output_dir or one of its checkpoint-* folders "
            f"(relative paths start from {os.getcwd()})"
        )
    problems = folder_problems(path)
    if problems:
        raise ConfigError(f"{label} is not as it was written: {'; '.join(problems)}; {damage_remedy(path)}")
    files = set(os.listdir(path))
    if "config.json" not in files:
        raise ConfigError(
            f"{label} has no config.json, so it is not a model directory; give a folder saved with save_pretrained"
        )
    if not files & {SAFETENSORS_WEIGHTS, SAFETENSORS_INDEX}:
        pickled = sorted(files & {"pytorch_model.bin", "pytorch_model.bin.index.json"})
        hint = f" (it has {', '.join(pickled)}, a pickle, which stim_hf never loads)" if pickled else ""
        raise ConfigError(
            f"{label} has no model.safetensors{hint}; convert the weights to safetensors "
            "(model.save_pretrained(dir) in a trusted environment) and try again"
        )
    for name in weight_files(path, label):
        problem = safetensors_problem(os.path.join(path, name))
        if problem:
            raise ConfigError(f"{label}: '{os.path.join(path, name)}' {problem}; re-save or re-copy the model")


def weight_files(path: str, label: str) -> list[str]:
    """The safetensors files ``from_pretrained`` loads from model folder ``path``, by name.

    ``model.safetensors`` when present (transformers prefers it), else every shard that
    ``model.safetensors.index.json`` names; a shard that is not a ``.safetensors`` file (an index
    pointing at pickled ``.bin`` shards) or is missing is a :class:`ConfigError`.
    """
    if os.path.isfile(os.path.join(path, SAFETENSORS_WEIGHTS)):
        return [SAFETENSORS_WEIGHTS]
    index_path = os.path.join(path, SAFETENSORS_INDEX)
    shards = sorted(set(_index_weight_map(index_path, label).values()))
    not_safetensors = [shard for shard in shards if not shard.endswith(".safetensors")]
    if not_safetensors:
        raise ConfigError(
            f"{label}: {SAFETENSORS_INDEX} names shards that are not safetensors files ({', '.join(not_safetensors)}; "
            "stim_hf never loads pickled weights); convert the weights to safetensors "
            "(model.save_pretrained(dir) in a trusted environment) and try again"
        )
    missing = [shard for shard in shards if not os.path.isfile(os.path.join(path, shard))]
    if missing:
        raise ConfigError(
            f"{label}: {SAFETENSORS_INDEX} names shards that are not in the folder ({', '.join(missing)}); "
            "copy the whole model folder again"
        )
    return shards


def _index_weight_map(index_path: str, label: str) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file) of a safetensors shard index."""
    try:
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle).get("weight_map")
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(
            f"{label}: {SAFETENSORS_INDEX} is unreadable ({type(error).__name__}: {error}); re-save or re-copy the model"
        ) from None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConfigError(
            f"{label}: {SAFETENSORS_INDEX} has no weight_map of tensor names to shard files; re-save or re-copy "
            "the model"
        )
    return weight_map


@contextmanager
def without_transformers_progress_bars() -> Iterator[None]:
    """transformers' own progress bars off for a while (their previous setting restored).

    Saving and loading a local model draw bars ("Writing model shards", "Loading weights", transformers 5) for
    work done in milliseconds: nothing to read, and they push a tool's own output or error line away.
    """
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_saved_classifier(path: str | os.PathLike, label: str | None = None) -> PreTrainedModel:
    """Load an image classifier saved with ``save_pretrained`` (checked first), in float32, safetensors only."""
    label = label or f"checkpoint '{path}'"
    check_saved_model_dir(path, label)
    try:  # stim_hf.models, imported above, has registered the CIFAR ResNets with the Auto classes
        with without_transformers_progress_bars():
            return AutoModelForImageClassification.from_pretrained(
                str(path), dtype=torch.float32, use_safetensors=True, trust_remote_code=False
            )
    except CifarResNetConfigError as err:  # a config.json edited by hand
        raise ConfigError(f"{label}: config.json: {err}; fix the value or re-save the model") from None

"""Building the model to train from :class:`~stim_hf.config.ModelArguments`, and loading saved models."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedModel

from stim_hf.config import ModelArguments
from stim_hf.errors import ConfigError


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
            raise
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
    A missing folder, one without ``config.json``, or one whose weights are not safetensors
    (``pytorch_model.bin`` is a pickle, and stim_hf never unpickles) is a :class:`ConfigError`.
    """
    path = os.path.expanduser(str(path))
    if not os.path.isdir(path):
        reason = "is a file" if os.path.exists(path) else "does not exist"
        raise ConfigError(
            f"{label} is not a directory ('{path}' {reason}); give a folder saved with save_pretrained "
            f"(config.json + model.safetensors), e.g. a training output_dir or one of its checkpoint-* folders "
            f"(relative paths start from {os.getcwd()})"
        )
    files = set(os.listdir(path))
    if "config.json" not in files:
        raise ConfigError(
            f"{label} has no config.json, so it is not a model directory; give a folder saved with save_pretrained"
        )
    if not files & {"model.safetensors", "model.safetensors.index.json"}:
        pickled = sorted(files & {"pytorch_model.bin", "pytorch_model.bin.index.json"})
        hint = f" (it has {', '.join(pickled)}, a pickle, which stim_hf never loads)" if pickled else ""
        raise ConfigError(
            f"{label} has no model.safetensors{hint}; convert the weights to safetensors "
            "(model.save_pretrained(dir) in a trusted environment) and try again"
        )


def load_saved_classifier(path: str | os.PathLike, label: str | None = None) -> PreTrainedModel:
    """Load an image classifier saved with ``save_pretrained`` (checked first), in float32, safetensors only."""
    check_saved_model_dir(path, label or f"checkpoint '{path}'")
    import stim_hf.models  # noqa: F401  (registers the CIFAR ResNets with the Auto classes)

    return AutoModelForImageClassification.from_pretrained(
        str(path), dtype=torch.float32, use_safetensors=True, trust_remote_code=False
    )

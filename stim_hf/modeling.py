"""Building the model to train from :class:`~stim_hf.config.ModelArguments`."""

from __future__ import annotations

from collections.abc import Sequence

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

"""Fitting the method to a model, before any data is loaded: its residual stages and samplers, its preparation.

:func:`method_structures` finds a model's residual family and stages and builds its training sampler;
:func:`full_input_sampler` the draws of multi-resolution training. Both raise the errors a misfit of
model and method gives (no residual stages, a ``sample_space`` that drops nothing, smaller inputs for a
family that cannot take them, ``zero_init_residual`` where it cannot apply), so the training job calls
them before it loads or decodes anything; :class:`~stim_hf.training.trainer.StimulativeTrainer` calls
them when built. :func:`prepare_model` applies ``sync_batchnorm`` and ``channels_last``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from stim_hf.errors import ConfigError, ModelStructureError
from stim_hf.method import FULL_INPUT_STREAM, ResidualFamily, ResidualStage, SubnetSampler, find_residual_family
from stim_hf.method.stages import zero_init_families
from stim_hf.training.config import StimulativeTrainingArguments

logger = logging.getLogger(__name__)

# Sub-network inputs are never resized below this side, whatever min_input_scale says.
MIN_SUBNET_INPUT_SIZE = 8


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


def build_subnet_sampler(
    model: nn.Module,
    family: ResidualFamily,
    stages: list[ResidualStage],
    args: StimulativeTrainingArguments,
    seed: int,
    min_input_scale: float,
    stream: int = 0,
) -> SubnetSampler:
    """The sub-network sampler of ``model`` under ``args``; ConfigError if the settings cannot work for it."""
    if min_input_scale < 1.0 and not family.supports_smaller_inputs:
        raise ConfigError(
            f"min_input_scale={min_input_scale}: {type(model).__name__} ({family.name}) cannot run "
            "on inputs smaller than its training size; set min_input_scale: 1.0 (depth sampling only)"
        )
    sampler = SubnetSampler(
        stages,
        rule=args.subnet_sampling,
        sample_space=args.sample_space,
        min_input_scale=min_input_scale,
        seed=seed,
        min_input_size=max(MIN_SUBNET_INPUT_SIZE, family.min_input_size(model) if family.min_input_size else 0),
        stream=stream,
        # The bias shapes the training draws only; the fixed evaluation sub-networks stay uniform.
        size_bias=args.subnet_size_bias if stream == 0 else 0.0,
    )
    if stream == 0 and args.uses_subnets and not any(sampler.space) and min_input_scale >= 1.0:
        raise ConfigError(
            f"sample_space={args.sample_space!r} lets sampling drop no block of "
            f"{type(model).__name__} (at most {[s.max_droppable(args.subnet_sampling) for s in stages]} "
            "per stage: a stage keeps its first block and blocks that change shape), and min_input_scale=1.0 keeps "
            "the full input size, so every sub-network would be the full network; use a deeper model, a larger "
            "sample_space, min_input_scale < 1, or stim_method: ct"
        )
    return sampler


def method_structures(
    model: nn.Module, args: StimulativeTrainingArguments
) -> tuple[ResidualFamily | None, list[ResidualStage] | None, SubnetSampler | None]:
    """``model``'s residual family, stages and training sampler; the errors a misfit of model and method raises.

    :class:`StimulativeTrainer` calls it when built; the training job calls it first, so that a
    model without residual stages or a ``sample_space`` that does not fit is reported before any
    data is loaded or decoded.
    """
    try:
        family, stages = find_residual_family(model)
    except ModelStructureError:
        if args.uses_subnets:
            raise
        logger.info("no residual stages found: sub-network evaluation is disabled for this model")
        family, stages = None, None
    if args.zero_init_residual:
        check_zero_init_residual(model, family)
    if args.full_input_scale < 1.0:
        full_input_sampler(model, family, stages, args)
    if family is None:
        return None, None, None
    return family, stages, build_subnet_sampler(model, family, stages, args, args.seed, args.min_input_scale)


def full_input_sampler(
    model: nn.Module,
    family: ResidualFamily | None,
    stages: list[ResidualStage] | None,
    args: StimulativeTrainingArguments,
) -> SubnetSampler | None:
    """The draws of the full network's input size under ``full_input_scale`` (None at 1.0, the batch's own size).

    The sub-networks' size rule and seed-and-step draw, in a stream of its own, so that turning multi-resolution
    training on leaves the sub-networks' draws as they were. ConfigError for a model that cannot run smaller inputs.
    """
    if args.full_input_scale >= 1.0:
        return None
    if family is None or not family.supports_smaller_inputs:
        which = f"{type(model).__name__} ({family.name} family)" if family is not None else type(model).__name__
        raise ConfigError(
            f"full_input_scale={args.full_input_scale}: {which} is not a model stim_hf can run on inputs smaller "
            "than its training size; set full_input_scale: 1.0"
        )
    return build_subnet_sampler(model, family, stages, args, args.seed, args.full_input_scale, FULL_INPUT_STREAM)


def refuse_zero_init_of_pretrained(source: str) -> ConfigError:
    """The error for ``zero_init_residual`` on the pretrained model ``source``: zeroing would discard trained branches."""
    return ConfigError(
        f"zero_init_residual=true would zero the last BatchNorm weight of every residual branch of the pretrained "
        f"model '{source}', discarding what those branches learned; it is for a model built from a config "
        "(model_type, fresh weights): set zero_init_residual: false to fine-tune"
    )


def check_zero_init_residual(model: nn.Module, family: ResidualFamily | None) -> None:
    """Refuse ``zero_init_residual`` for a model it cannot or must not change (ConfigError, one line).

    A model loaded with ``from_pretrained`` (its ``name_or_path`` is set) is refused: its branches
    were trained. So is a model of a family without a normalisation layer ending its branches.
    """
    source = getattr(model, "name_or_path", "") or ""
    if source:
        raise refuse_zero_init_of_pretrained(str(source))
    if family is None or family.last_branch_norm is None:
        which = f"{type(model).__name__} ({family.name} family)" if family is not None else type(model).__name__
        raise ConfigError(
            f"zero_init_residual=true: {which} has no BatchNorm ending its residual branches that stim_hf knows "
            f"(families with one: {', '.join(zero_init_families())}); set zero_init_residual: false"
        )

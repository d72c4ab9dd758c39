"""Residual stages of a model: where the blocks are, and which of them may be skipped.

A residual network is run as a sub-network by skipping blocks. A block can be skipped only when
its input and output shapes match (identity shortcut). Model families keep their blocks in
different places, so finding them is a registry of *stage finders*: a function that takes a
model and returns its :class:`ResidualStage` list, or ``None`` when the model is not of its family.
Users register their own families with :func:`register_stage_finder`; the built-in ones are in
:mod:`stim_hf.method.families`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stim_hf.errors import ModelStructureError


@dataclass(frozen=True)
class ResidualStage:
    """A container of residual blocks that the model's forward iterates in order.

    ``container`` is an ``nn.Sequential`` or ``nn.ModuleList`` whose forward (or the model's) runs
    ``for block in container``; running a sub-network temporarily replaces its entries with the
    kept blocks. ``skippable[i]`` says whether block ``i`` may be dropped (identity shortcut).
    """

    name: str
    container: nn.Module
    skippable: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.skippable) != len(self.container):
            raise ModelStructureError(
                f"stage '{self.name}' has {len(self.container)} blocks but {len(self.skippable)} "
                "skippable flags; a stage finder must return one flag per block"
            )

    @property
    def num_blocks(self) -> int:
        """Number of blocks in the full stage."""
        return len(self.skippable)

    @property
    def num_skippable(self) -> int:
        """Number of blocks that may be dropped in any combination (subset sampling)."""
        return sum(self.skippable)

    @property
    def num_trailing_skippable(self) -> int:
        """Number of blocks at the end of the stage that may be dropped together (prefix sampling)."""
        count = 0
        for flag in reversed(self.skippable):
            if not flag:
                break
            count += 1
        return count

    def max_droppable(self, rule: str) -> int:
        """Largest number of blocks a sampling rule (``prefix`` or ``subset``) may drop here.

        A stage always keeps at least one block, as in the released code's full sample space
        (ResNet-50: ``d_s < n_s``); beyond that, only skippable blocks can go.
        """
        droppable = self.num_trailing_skippable if rule == "prefix" else self.num_skippable
        return min(droppable, self.num_blocks - 1)


@dataclass(frozen=True)
class ResidualFamily:
    """A registered model family: how to find its stages and how it takes smaller inputs.

    ``find_stages`` returns the stages, or ``None`` when the model is not of this family.
    ``supports_smaller_inputs`` is False for models whose forward breaks on inputs smaller than the
    training size (windowed attention). ``resized_forward_kwargs`` are extra keyword arguments for
    the model's forward when it runs on a resized input (ViT: ``interpolate_pos_encoding=True``).
    ``config_for_depths(config, depths)`` returns the model config of the prefix sub-network that
    keeps ``depths[s]`` blocks of stage ``s`` (used by :mod:`stim_hf.tools.export`); ``None`` when the
    family's config cannot express it. ``min_input_size(model)`` is the smallest input side the
    model's forward accepts (ConvNeXt: its total stride); sampled input sizes never go below it.
    ``last_branch_norm(block)`` is the normalisation layer that ends ``block``'s residual branch (the
    BatchNorm whose weight ``zero_init_residual`` zeroes), or ``None`` for a block without one;
    ``None`` for a family without such a layer. ``config_for_input_size(config, size)`` returns a
    config whose model resizes its input to ``size`` itself, as training resizes a sub-network's
    batch (CIFAR ResNet: ``resize_input_to``); an export at a smaller input then keeps the trained
    image processor. ``None``: the export's image processor resizes to ``size`` (antialiased, which
    the sub-network did not see in training).
    """

    name: str
    find_stages: Callable[[nn.Module], list[ResidualStage] | None]
    supports_smaller_inputs: bool = True
    resized_forward_kwargs: dict = field(default_factory=dict)
    config_for_depths: Callable[[Any, Sequence[int]], Any] | None = None
    min_input_size: Callable[[nn.Module], int] | None = None
    last_branch_norm: Callable[[nn.Module], nn.Module | None] | None = None
    config_for_input_size: Callable[[Any, int], Any] | None = None


_FAMILIES: dict[str, ResidualFamily] = {}


def register_stage_finder(
    name: str,
    find_stages: Callable[[nn.Module], list[ResidualStage] | None],
    *,
    supports_smaller_inputs: bool = True,
    resized_forward_kwargs: dict | None = None,
    config_for_depths: Callable[[Any, Sequence[int]], Any] | None = None,
    min_input_size: Callable[[nn.Module], int] | None = None,
    last_branch_norm: Callable[[nn.Module], nn.Module | None] | None = None,
    config_for_input_size: Callable[[Any, int], Any] | None = None,
    overwrite: bool = False,
) -> ResidualFamily:
    """Register how to find the residual stages of a model family.

    ``find_stages(model)`` returns a list of :class:`ResidualStage` for models of the family and
    ``None`` for any other model. Families are tried in registration order, the most recently
    registered first, so a user's finder takes precedence over the built-in ones.
    ``config_for_depths(config, depths)`` (optional) returns the config of the shallower model that
    keeps ``depths[s]`` leading blocks of each stage; it makes the family exportable with
    :func:`stim_hf.tools.export.export_subnet`. ``min_input_size(model)`` (optional) is the smallest
    input side the model accepts; smaller sampled inputs are raised to it. ``last_branch_norm(block)``
    (optional) returns the normalisation layer that ends a block's residual branch; it makes the
    family usable with ``zero_init_residual``. ``config_for_input_size(config, size)`` (optional)
    returns the config of the same model resizing its own input to ``size``; exports at a smaller
    input then see it resized exactly as in training.
    """
    if name in _FAMILIES and not overwrite:
        raise ValueError(f"a stage finder named '{name}' is already registered; pass overwrite=True")
    family = ResidualFamily(
        name=name,
        find_stages=find_stages,
        supports_smaller_inputs=supports_smaller_inputs,
        resized_forward_kwargs=dict(resized_forward_kwargs or {}),
        config_for_depths=config_for_depths,
        min_input_size=min_input_size,
        last_branch_norm=last_branch_norm,
        config_for_input_size=config_for_input_size,
    )
    _FAMILIES.pop(name, None)
    _FAMILIES[name] = family
    return family


def registered_families() -> list[str]:
    """Names of the registered model families, in the order they are tried."""
    return list(reversed(_FAMILIES))


def zero_init_families() -> list[str]:
    """Names of the registered families with a ``last_branch_norm`` (``zero_init_residual`` works for them)."""
    return [name for name in registered_families() if _FAMILIES[name].last_branch_norm is not None]


def find_residual_family(
    model: nn.Module, require_skippable: bool = True
) -> tuple[ResidualFamily, list[ResidualStage]]:
    """Return the family of ``model`` and its residual stages.

    Raises :class:`ModelStructureError` when no registered family recognises the model or, with
    ``require_skippable`` (training, search), when the stages found contain no skippable block; an
    exported sub-network that keeps only the shape-changing blocks has none and is still a model.
    """
    for family in reversed(list(_FAMILIES.values())):
        stages = family.find_stages(model)
        if stages is None:
            continue
        if require_skippable and (not stages or not any(stage.num_skippable for stage in stages)):
            why = (
                "(every block changes its input's shape)" if any(s.num_blocks for s in stages) else "(it has no blocks)"
            )
            raise ModelStructureError(
                f"{type(model).__name__} ({family.name} family) has no skippable residual block {why}, so there is "
                "no sub-network to train; use stim_method 'ct' or a deeper model"
            )
        return family, stages
    raise ModelStructureError(
        f"no residual stages found in {type(model).__name__}: stimulative training needs a residual "
        f"network whose block containers stim_hf knows (registered families: "
        f"{', '.join(registered_families())}). Register your model's stages with "
        "stim_hf.register_stage_finder(name, find_stages); see docs/models.md, 'Your own family'"
    )


def find_residual_stages(model: nn.Module) -> list[ResidualStage]:
    """Return the residual stages of ``model`` (see :func:`find_residual_family`)."""
    return find_residual_family(model)[1]


def zero_init_residual_branches(family: ResidualFamily, stages: Sequence[ResidualStage]) -> int:
    """Zero the weight of the normalisation layer that ends every residual branch; return how many.

    Each block then starts as its shortcut (the identity for a skippable block), as in Goyal et al.
    2017 and torchvision's / timm's ``zero_init_residual`` / ``zero_init_last``. Every block of
    ``stages`` is zeroed, skippable or not. Raises :class:`ModelStructureError` for a family without
    ``last_branch_norm``, or one whose blocks have no such layer with a weight.
    """
    if family.last_branch_norm is None:
        raise ModelStructureError(f"the {family.name} family has no registered last_branch_norm")
    zeroed = 0
    with torch.no_grad():
        for stage in stages:
            for block in stage.container:
                norm = family.last_branch_norm(block)
                weight = getattr(norm, "weight", None) if norm is not None else None
                if isinstance(weight, torch.Tensor):
                    weight.zero_()
                    zeroed += 1
    if not zeroed:
        raise ModelStructureError(
            f"the {family.name} family's blocks have no normalisation layer with a weight ending their residual branch"
        )
    return zeroed


def identity_shortcut_flags(blocks: Sequence[nn.Module], shortcut_attr: str) -> tuple[bool, ...]:
    """Flag each block whose ``shortcut_attr`` is absent, ``None`` or an ``nn.Identity``."""
    flags = []
    for block in blocks:
        shortcut = getattr(block, shortcut_attr, None)
        flags.append(shortcut is None or isinstance(shortcut, nn.Identity))
    return tuple(flags)


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None

"""The built-in model families: where each keeps its residual blocks, and how its config says depth.

Every family is a *stage finder* registered with :func:`~stim_hf.method.stages.register_stage_finder`:
it returns the :class:`~stim_hf.method.stages.ResidualStage` list of a model of its family (the
block containers that the model's forward iterates, and which blocks have an identity shortcut), or
``None`` for any other model. Families whose config can express a shallower network also register
``config_for_depths``, which :mod:`stim_hf.tools.export` uses to write a sub-network as a standalone model.

docs/models.md has the table of families; this module is imported by ``stim_hf.method``, so the
finders are registered as soon as the package is.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Any

from torch import nn
from transformers import PreTrainedConfig

from stim_hf.errors import ModelStructureError
from stim_hf.method.stages import ResidualStage, identity_shortcut_flags, register_stage_finder

# Forward keyword arguments that let position-embedding models run on a resized input.
INTERPOLATE_POS_ENCODING = {"interpolate_pos_encoding": True}


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _base_model(model: nn.Module, attribute: str, base_class_name: str) -> tuple[nn.Module, str] | None:
    """``(base, prefix)``: ``model`` itself or its ``attribute`` when that is a ``base_class_name``, else None.

    ``base_class_name`` is a transformers class, imported only for models whose ``base_model_prefix``
    is ``attribute`` (so that recognising a model does not import every family's modeling code).
    ``prefix`` is the module path of the base inside ``model`` (with a trailing dot, or empty).
    """
    if getattr(model, "base_model_prefix", None) != attribute:
        return None
    import transformers

    base_class = getattr(transformers, base_class_name)
    if isinstance(model, base_class):
        return model, ""
    base = getattr(model, attribute, None)
    if isinstance(base, base_class):
        return base, f"{attribute}."
    return None


def _stages_of(prefix: str, path: str, containers: Sequence[nn.Module], skippable) -> list[ResidualStage]:
    """One stage per container; ``path`` is formatted with the stage index ``i``."""
    return [
        ResidualStage(name=prefix + path.format(i=i), container=container, skippable=tuple(skippable(container)))
        for i, container in enumerate(containers)
    ]


def _all_skippable(container: nn.Module) -> list[bool]:
    """Every block of the container keeps its input's shape (transformer / ConvNeXt blocks)."""
    return [True] * len(container)


def replace_config(config: PreTrainedConfig, **changes: Any) -> PreTrainedConfig:
    """A new config of the same class with some fields changed (rebuilt, so derived fields follow)."""
    return type(config).from_dict({**config.to_dict(), **changes})


def _depths_config(field_name: str):
    """``config_for_depths`` for configs that hold the blocks per stage in one list field."""

    def config_for_depths(config: PreTrainedConfig, depths: Sequence[int]) -> PreTrainedConfig:
        return replace_config(config, **{field_name: list(depths)})

    config_for_depths.__doc__ = f"The config with ``{field_name}`` set to the kept blocks per stage."
    return config_for_depths


def _num_layers_config(config: PreTrainedConfig, depths: Sequence[int]) -> PreTrainedConfig:
    """The config of a single-stage transformer with ``num_hidden_layers`` kept blocks."""
    return replace_config(config, num_hidden_layers=int(depths[0]))


def _timm_model_args_config(argument: str):
    """``config_for_depths`` for timm models whose builder takes the per-stage depths as ``argument``.

    The depths go into ``TimmWrapperConfig.model_args``, which ``timm.create_model`` receives and which
    overrides the architecture's own value (timm builders merge ``dict(model_args, **kwargs)``).
    """

    def config_for_depths(config: PreTrainedConfig, depths: Sequence[int]) -> PreTrainedConfig:
        model_args = dict(config.model_args or {})
        model_args[argument] = list(depths)
        return replace_config(config, model_args=model_args)

    config_for_depths.__doc__ = f"The TimmWrapper config with ``model_args['{argument}']`` set to the depths."
    return config_for_depths


def _not_exportable(reason: str):
    """``config_for_depths`` for families whose config cannot express a shallower network."""

    def config_for_depths(config: PreTrainedConfig, depths: Sequence[int]) -> PreTrainedConfig:
        raise ModelStructureError(reason)

    return config_for_depths


# ------------------------------------------------------------------------------------------------
# A stage that is a run of blocks inside a flat container (MobileNetV2)
# ------------------------------------------------------------------------------------------------


class ContainerSlice(nn.Module):
    """A run of consecutive blocks of a flat container that other stages share.

    MobileNetV2 keeps all its blocks in one flat ``nn.ModuleList``. A slice behaves like a container
    of its own run: :func:`~stim_hf.method.use_subnet` replaces a slice's ``_modules`` with the kept
    blocks, and the slice then rewrites the flat container as the concatenation of every slice's
    current blocks, so several stages of one container can be shortened together and restored in
    any order. The slice is not registered in the model (the model's modules are unchanged).
    """

    def __init__(self, flat: nn.Module, keys: Sequence[str], group: list[ContainerSlice]) -> None:
        """A slice of ``flat`` holding the blocks named ``keys``; ``group`` lists every slice of ``flat``."""
        object.__setattr__(self, "_slice_ready", False)
        super().__init__()
        object.__setattr__(self, "_flat", flat)
        object.__setattr__(self, "_group", group)
        object.__setattr__(self, "_selection", OrderedDict((key, flat._modules[key]) for key in keys))
        object.__setattr__(self, "_slice_ready", True)
        group.append(self)

    @property
    def _modules(self) -> dict[str, nn.Module]:  # type: ignore[override]
        """The blocks this slice currently holds (all of its run, or the kept ones of a sub-network)."""
        return self.__dict__["_selection"] if self.__dict__.get("_slice_ready") else {}

    @_modules.setter
    def _modules(self, modules: dict[str, nn.Module]) -> None:
        if not self.__dict__.get("_slice_ready"):
            return  # nn.Module.__init__ sets an empty dict; the selection is set afterwards
        self.__dict__["_selection"] = OrderedDict(modules)
        flat = self.__dict__["_flat"]
        flat._modules = OrderedDict(chain.from_iterable(s.__dict__["_selection"].items() for s in self._group))

    def __len__(self) -> int:
        """Number of blocks currently held."""
        return len(self._modules)

    def __iter__(self) -> Iterator[nn.Module]:
        """The blocks currently held, in order."""
        return iter(self._modules.values())

    def __getitem__(self, index: int) -> nn.Module:
        """Block ``index`` of those currently held."""
        return list(self._modules.values())[index]

    def extra_repr(self) -> str:
        """The flat container's keys of the blocks held, for ``print``."""
        return "blocks " + ",".join(self._modules)


def split_at_shape_changes(flat: nn.Module, name: str, skippable: Sequence[bool]) -> list[ResidualStage]:
    """Split a flat block container into stages, each starting at a block that changes the shape.

    Every stage is a run ``[non-skippable block, skippable blocks...]`` (the first stage may start
    with skippable blocks), so prefix sampling, which drops trailing blocks of a stage, reaches every
    skippable block. The stages are :class:`ContainerSlice` views of ``flat``.
    """
    keys = list(flat._modules)
    runs: list[list[int]] = []
    for index, flag in enumerate(skippable):
        if not runs or not flag:
            runs.append([])
        runs[-1].append(index)
    group: list[ContainerSlice] = []
    return [
        ResidualStage(
            name=f"{name}[{run[0]}:{run[-1] + 1}]",
            container=ContainerSlice(flat, [keys[i] for i in run], group),
            skippable=tuple(skippable[i] for i in run),
        )
        for run in runs
    ]


# ------------------------------------------------------------------------------------------------
# stim_hf and Hugging Face transformers families
# ------------------------------------------------------------------------------------------------


def find_cifar_resnet_stages(model: nn.Module) -> list[ResidualStage] | None:
    """CIFAR ResNet (stim_hf): ``resnet.stages[i].layers``; skippable where ``shortcut`` is Identity."""
    from stim_hf.models.cifar_resnet import CifarResNetModel

    if isinstance(model, CifarResNetModel):
        base, prefix = model, ""
    elif isinstance(getattr(model, "resnet", None), CifarResNetModel):
        base, prefix = model.resnet, "resnet."
    else:
        return None
    containers = [stage.layers for stage in base.stages]
    return _stages_of(prefix, "stages.{i}.layers", containers, _identity_shortcuts)


def _identity_shortcuts(container: nn.Module) -> tuple[bool, ...]:
    return identity_shortcut_flags(container, "shortcut")


def _hf_encoder_stages(
    model: nn.Module, attribute: str, class_name: str, skippable, block_types: tuple[type, ...] = ()
) -> list[ResidualStage] | None:
    """Stages of an HF model that keeps its blocks in ``<attribute>.encoder.stages[i].layers``."""
    found = _base_model(model, attribute, class_name)
    if found is None:
        return None
    base, prefix = found
    containers = [stage.layers for stage in base.encoder.stages]
    if block_types and not all(isinstance(b, block_types) for c in containers for b in c):
        return None
    return _stages_of(prefix, "encoder.stages.{i}.layers", containers, skippable)


def find_hf_resnet_stages(model: nn.Module) -> list[ResidualStage] | None:
    """HF ResNet: ``resnet.encoder.stages[i].layers``; skippable where ``shortcut`` is Identity."""
    if _base_model(model, "resnet", "ResNetModel") is None:
        return None
    from transformers.models.resnet.modeling_resnet import ResNetBasicLayer, ResNetBottleNeckLayer

    blocks = (ResNetBasicLayer, ResNetBottleNeckLayer)
    return _hf_encoder_stages(model, "resnet", "ResNetModel", _identity_shortcuts, blocks)


def find_hf_regnet_stages(model: nn.Module) -> list[ResidualStage] | None:
    """HF RegNet: ``regnet.encoder.stages[i].layers``; skippable where ``shortcut`` is Identity."""
    return _hf_encoder_stages(model, "regnet", "RegNetModel", _identity_shortcuts)


def find_hf_convnext_stages(model: nn.Module) -> list[ResidualStage] | None:
    """HF ConvNeXt: ``convnext.encoder.stages[i].layers``; downsampling is separate, every block skippable."""
    return _hf_encoder_stages(model, "convnext", "ConvNextModel", _all_skippable)


def find_hf_convnextv2_stages(model: nn.Module) -> list[ResidualStage] | None:
    """HF ConvNeXt V2: ``convnextv2.encoder.stages[i].layers``; every block skippable."""
    return _hf_encoder_stages(model, "convnextv2", "ConvNextV2Model", _all_skippable)


def find_hf_mobilenet_v2_stages(model: nn.Module) -> list[ResidualStage] | None:
    """HF MobileNetV2: ``mobilenet_v2.layer`` (flat), split into stages at the blocks without residual.

    The 16 inverted-residual blocks form the paper's bottleneck groups (2, 3, 4, 3, 3, 1 blocks at
    the default width): each group starts with a block that changes channels or stride
    (``use_residual`` False, never dropped) followed by residual blocks that may be dropped.
    """

    found = _base_model(model, "mobilenet_v2", "MobileNetV2Model")
    if found is None:
        return None
    base, prefix = found
    flags = [bool(getattr(block, "use_residual", False)) for block in base.layer]
    return split_at_shape_changes(base.layer, f"{prefix}layer", flags)


def _transformer_layers(base: nn.Module) -> tuple[nn.Module, str] | None:
    """The block list of a ViT-style encoder: ``layers`` (transformers >= 5.x) or ``encoder.layer``."""
    layers = getattr(base, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers, "layers"
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if isinstance(layers, nn.ModuleList):
        return layers, "encoder.layer"
    return None


def _find_vit_like(model: nn.Module, attribute: str, base_class_name: str) -> list[ResidualStage] | None:
    """The one stage of a ViT-style model: its list of transformer blocks."""
    found = _base_model(model, attribute, base_class_name)
    if found is None:
        return None
    base, prefix = found
    layers = _transformer_layers(base)
    if layers is None:
        return None
    container, path = layers
    return [ResidualStage(name=prefix + path, container=container, skippable=tuple(_all_skippable(container)))]


def find_hf_vit_stages(model: nn.Module) -> list[ResidualStage] | None:
    """HF ViT: one stage, ``vit.layers`` (``vit.encoder.layer`` in older versions); every block skippable."""
    return _find_vit_like(model, "vit", "ViTModel")


def find_hf_deit_stages(model: nn.Module) -> list[ResidualStage] | None:
    """HF DeiT: one stage, ``deit.layers`` (``deit.encoder.layer`` in older versions); every block skippable."""
    return _find_vit_like(model, "deit", "DeiTModel")


def find_hf_swin_stages(model: nn.Module) -> list[ResidualStage] | None:
    """HF Swin: ``swin.encoder.layers[i].blocks``; patch merging is separate, every block skippable."""

    found = _base_model(model, "swin", "SwinModel")
    if found is None:
        return None
    base, prefix = found
    containers = [stage.blocks for stage in base.encoder.layers]
    return _stages_of(prefix, "encoder.layers.{i}.blocks", containers, _all_skippable)


# ------------------------------------------------------------------------------------------------
# timm models through transformers.TimmWrapperForImageClassification
# ------------------------------------------------------------------------------------------------


def _timm_model(model: nn.Module, class_path: str, class_names: Sequence[str]) -> nn.Module | None:
    """The wrapped timm model when it is one of ``class_names`` of module ``class_path``, else None."""
    timm_model = getattr(model, "timm_model", None)
    if timm_model is None:
        return None
    try:
        import importlib

        module = importlib.import_module(class_path)
    except ImportError:
        return None
    classes = tuple(getattr(module, name) for name in class_names if hasattr(module, name))
    return timm_model if classes and isinstance(timm_model, classes) else None


def find_timm_resnet_stages(model: nn.Module) -> list[ResidualStage] | None:
    """timm ResNet (and ResNet-D, SE-ResNet, ResNeXt...): ``layer1..layer4``; skippable where ``downsample`` is None."""
    timm_model = _timm_model(model, "timm.models.resnet", ["ResNet"])
    if timm_model is None:
        return None
    containers = [getattr(timm_model, f"layer{i + 1}") for i in range(4)]
    return [
        ResidualStage(
            name=f"timm_model.layer{i + 1}",
            container=container,
            skippable=tuple(getattr(block, "downsample", None) is None for block in container),
        )
        for i, container in enumerate(containers)
    ]


def find_timm_efficientnet_stages(model: nn.Module) -> list[ResidualStage] | None:
    """timm EfficientNet / MobileNetV3 (and their relatives): ``blocks[s]``; skippable where ``has_skip``."""
    timm_model = _timm_model(model, "timm.models", ["EfficientNet", "MobileNetV3"])
    if timm_model is None:
        return None
    return _stages_of(
        "timm_model.",
        "blocks.{i}",
        list(timm_model.blocks),
        lambda c: [bool(getattr(block, "has_skip", False)) for block in c],
    )


def find_timm_convnext_stages(model: nn.Module) -> list[ResidualStage] | None:
    """timm ConvNeXt: ``stages[i].blocks``; downsampling is separate, skippable where ``shortcut`` is Identity."""
    timm_model = _timm_model(model, "timm.models.convnext", ["ConvNeXt"])
    if timm_model is None:
        return None
    containers = [stage.blocks for stage in timm_model.stages]
    return _stages_of("timm_model.", "stages.{i}.blocks", containers, lambda c: identity_shortcut_flags(c, "shortcut"))


# ------------------------------------------------------------------------------------------------
# Registration (later registrations are tried first; user families registered after import win)
# ------------------------------------------------------------------------------------------------

_MOBILENET_V2_NOT_EXPORTABLE = (
    "MobileNetV2's config has no per-stage depth (transformers builds a fixed list of 16 blocks), so a "
    "shallower MobileNetV2 cannot be saved as a standalone transformers model; run the sub-network inside "
    "the full model with stim_hf.use_subnet instead (docs/models.md)"
)
_TIMM_EFFICIENTNET_NOT_EXPORTABLE = (
    "timm builds EfficientNet / MobileNetV3 from a block-definition string per architecture, which "
    "TimmWrapperConfig.model_args cannot override per stage, so a shallower model cannot be saved as a "
    "standalone timm wrapper; run the sub-network inside the full model with stim_hf.use_subnet instead "
    "(docs/models.md)"
)


def _last_conv_layer_norm(block: nn.Module) -> nn.Module | None:
    """HF ResNet / RegNet: the ``normalization`` of the last conv layer of ``block.layer`` (its activation is None)."""
    layers = getattr(block, "layer", None)
    return getattr(layers[-1], "normalization", None) if isinstance(layers, nn.Sequential) and len(layers) else None


def _timm_resnet_last_norm(block: nn.Module) -> nn.Module | None:
    """timm ResNet: ``bn3`` of a Bottleneck, ``bn2`` of a BasicBlock (the layer timm's ``zero_init_last`` zeroes)."""
    norm = getattr(block, "bn3", None)
    return norm if norm is not None else getattr(block, "bn2", None)


def _cifar_resnet_resized_config(config: PreTrainedConfig, size: int) -> PreTrainedConfig:
    """The CIFAR ResNet config whose model resizes its input to ``size`` (``resize_input_to``)."""
    return replace_config(config, resize_input_to=size)


register_stage_finder(
    "cifar_resnet",
    find_cifar_resnet_stages,
    config_for_depths=_depths_config("blocks_per_stage"),
    last_branch_norm=lambda block: getattr(block, "bn2", None),
    config_for_input_size=_cifar_resnet_resized_config,
)
register_stage_finder(
    "hf_resnet",
    find_hf_resnet_stages,
    config_for_depths=_depths_config("depths"),
    last_branch_norm=_last_conv_layer_norm,
)
register_stage_finder(
    "hf_regnet",
    find_hf_regnet_stages,
    config_for_depths=_depths_config("depths"),
    last_branch_norm=_last_conv_layer_norm,
)


def convnext_total_stride(model: nn.Module) -> int:
    """Input side below which a ConvNeXt's last stage gets no pixel: patch size x 2^(stages - 1)."""
    config = model.config
    return config.patch_size * 2 ** (config.num_stages - 1)


register_stage_finder(
    "hf_convnext",
    find_hf_convnext_stages,
    config_for_depths=_depths_config("depths"),
    min_input_size=convnext_total_stride,
)
register_stage_finder(
    "hf_convnextv2",
    find_hf_convnextv2_stages,
    config_for_depths=_depths_config("depths"),
    min_input_size=convnext_total_stride,
)
register_stage_finder(
    "hf_mobilenet_v2",
    find_hf_mobilenet_v2_stages,
    config_for_depths=_not_exportable(_MOBILENET_V2_NOT_EXPORTABLE),
)


def vit_patch_size(model: nn.Module) -> int:
    """Input side below which a ViT's patch embedding gets no patch: its patch size."""
    patch = model.config.patch_size
    return max(patch) if isinstance(patch, (list, tuple)) else int(patch)


register_stage_finder(
    "hf_vit",
    find_hf_vit_stages,
    resized_forward_kwargs=INTERPOLATE_POS_ENCODING,
    config_for_depths=_num_layers_config,
    min_input_size=vit_patch_size,
)
register_stage_finder(
    "hf_deit",
    find_hf_deit_stages,
    resized_forward_kwargs=INTERPOLATE_POS_ENCODING,
    config_for_depths=_num_layers_config,
    min_input_size=vit_patch_size,
)
register_stage_finder(
    "hf_swin",
    find_hf_swin_stages,
    supports_smaller_inputs=False,
    config_for_depths=_depths_config("depths"),
)
register_stage_finder(
    "timm_resnet",
    find_timm_resnet_stages,
    config_for_depths=_timm_model_args_config("layers"),
    last_branch_norm=_timm_resnet_last_norm,
)
register_stage_finder(
    "timm_efficientnet",
    find_timm_efficientnet_stages,
    config_for_depths=_not_exportable(_TIMM_EFFICIENTNET_NOT_EXPORTABLE),
)
register_stage_finder(
    "timm_convnext",
    find_timm_convnext_stages,
    config_for_depths=_timm_model_args_config("depths"),
    # timm's feature_info gives each stage's reduction; the last one is the total stride.
    min_input_size=lambda model: model.timm_model.feature_info[-1]["reduction"],
)

"""Built-in model families: stages found, skippable flags, sampling, and two ST++ steps for each."""

from __future__ import annotations

import pytest
import torch
from test_trainer import make_args, make_dataset
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    MobileNetV1Config,
    MobileNetV1ForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    RegNetConfig,
    RegNetForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from stim_hf import StimulativeTrainer
from stim_hf.errors import ConfigError, ModelStructureError
from stim_hf.method import (
    SubnetSampler,
    find_residual_family,
    find_residual_stages,
    subnet_from_depths,
    use_subnet,
)
from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification

NUM_LABELS = 10
IMAGE_SIZE = 16  # every tiny model below runs at 16 px, and at 8 px (the smallest sub-network input)


# --------------------------------------------------------------------------------------------------
# Tiny models of every family (shared with test_export.py)
# --------------------------------------------------------------------------------------------------


def _timm(architecture: str, **model_args):
    pytest.importorskip("timm")
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config = TimmWrapperConfig(architecture=architecture, num_labels=NUM_LABELS, model_args=model_args or None)
    return TimmWrapperForImageClassification(config)


VIT_SIZES = dict(image_size=IMAGE_SIZE, patch_size=4, hidden_size=16, num_hidden_layers=3, num_attention_heads=2)

BUILDERS = {
    "cifar_resnet": lambda: CifarResNetForImageClassification(
        CifarResNetConfig(depth=14, widths=[8, 16, 32], num_labels=NUM_LABELS)
    ),
    "hf_resnet": lambda: ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32], depths=[2, 3, 2], num_labels=NUM_LABELS)
    ),
    "hf_regnet": lambda: RegNetForImageClassification(
        RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 24], depths=[2, 3, 2], groups_width=8, num_labels=NUM_LABELS
        )
    ),
    "hf_convnext": lambda: ConvNextForImageClassification(
        ConvNextConfig(num_stages=3, hidden_sizes=[8, 16, 32], depths=[2, 3, 2], patch_size=2, num_labels=NUM_LABELS)
    ),
    "hf_convnextv2": lambda: ConvNextV2ForImageClassification(
        ConvNextV2Config(num_stages=3, hidden_sizes=[8, 16, 32], depths=[2, 3, 2], patch_size=2, num_labels=NUM_LABELS)
    ),
    "hf_mobilenet_v2": lambda: MobileNetV2ForImageClassification(
        MobileNetV2Config(depth_multiplier=0.35, image_size=IMAGE_SIZE, finegrained_output=False, num_labels=NUM_LABELS)
    ),
    "hf_vit": lambda: ViTForImageClassification(ViTConfig(**VIT_SIZES, intermediate_size=32, num_labels=NUM_LABELS)),
    "hf_deit": lambda: DeiTForImageClassification(DeiTConfig(**VIT_SIZES, intermediate_size=32, num_labels=NUM_LABELS)),
    "hf_swin": lambda: SwinForImageClassification(
        SwinConfig(
            image_size=IMAGE_SIZE,
            patch_size=2,
            embed_dim=8,
            depths=[2, 3, 2],
            num_heads=[1, 2, 2],
            window_size=2,
            num_labels=NUM_LABELS,
        )
    ),
    "timm_resnet": lambda: _timm("resnet18", channels=[16, 32, 64, 128], stem_width=16),
    "timm_convnext": lambda: _timm("convnext_atto", dims=[16, 32, 64, 128], depths=[2, 2, 3, 2], patch_size=1),
    "timm_mobilenetv3": lambda: _timm("mobilenetv3_small_050"),
    "timm_efficientnet": lambda: _timm("tinynet_e"),  # an EfficientNet (same class and blocks), 0.8M parameters
}


def build(name: str, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised model of family ``name``."""
    torch.manual_seed(seed)
    return BUILDERS[name]()


def _identity(block: nn.Module, attribute: str) -> bool:
    shortcut = getattr(block, attribute, None)
    return shortcut is None or isinstance(shortcut, nn.Identity)


def expected_stages(name: str, model: nn.Module) -> list[tuple[list[nn.Module], list[bool]]]:
    """The blocks and skippable flags of every stage, read off the model independently of the finders."""

    def stages(containers, rule):
        return [(list(c), [rule(b) for b in c]) for c in containers]

    if name == "cifar_resnet":
        return stages([s.layers for s in model.resnet.stages], lambda b: _identity(b, "shortcut"))
    if name in ("hf_resnet", "hf_regnet"):
        base = model.resnet if name == "hf_resnet" else model.regnet
        return stages([s.layers for s in base.encoder.stages], lambda b: _identity(b, "shortcut"))
    if name in ("hf_convnext", "hf_convnextv2"):
        base = model.convnext if name == "hf_convnext" else model.convnextv2
        return stages([s.layers for s in base.encoder.stages], lambda b: True)
    if name == "hf_mobilenet_v2":
        blocks = list(model.mobilenet_v2.layer)
        starts = [i for i, b in enumerate(blocks) if i == 0 or not b.use_residual] + [len(blocks)]
        runs = [blocks[a:b] for a, b in zip(starts, starts[1:], strict=False)]
        return stages(runs, lambda b: b.use_residual)
    if name in ("hf_vit", "hf_deit"):
        return stages([model.vit.layers if name == "hf_vit" else model.deit.layers], lambda b: True)
    if name == "hf_swin":
        return stages([s.blocks for s in model.swin.encoder.layers], lambda b: True)
    timm_model = model.timm_model
    if name == "timm_resnet":
        return stages([getattr(timm_model, f"layer{i}") for i in range(1, 5)], lambda b: b.downsample is None)
    if name == "timm_convnext":
        return stages([s.blocks for s in timm_model.stages], lambda b: _identity(b, "shortcut"))
    return stages(list(timm_model.blocks), lambda b: bool(getattr(b, "has_skip", False)))


FAMILY_OF = {name: name for name in BUILDERS} | {"timm_mobilenetv3": "timm_efficientnet"}


# --------------------------------------------------------------------------------------------------
# Stage discovery and sampling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_stages_match_structure(name):
    model = build(name).eval()
    family, stages = find_residual_family(model)
    assert family.name == FAMILY_OF[name]
    expected = expected_stages(name, model)
    assert len(stages) == len(expected)
    for stage, (blocks, flags) in zip(stages, expected, strict=True):
        assert list(stage.container) == blocks, stage.name
        assert list(stage.skippable) == flags, stage.name
    assert any(any(flags) for _, flags in expected)
    # The shallowest prefix sub-network runs, at the full size and (where supported) at 8 px.
    subnet = subnet_from_depths(stages, [s.num_blocks - s.max_droppable("prefix") for s in stages])
    sizes = [IMAGE_SIZE, 8] if family.supports_smaller_inputs else [IMAGE_SIZE]
    with torch.no_grad(), use_subnet(stages, subnet):
        for size in sizes:
            kwargs = family.resized_forward_kwargs if size != IMAGE_SIZE else {}
            logits = model(pixel_values=torch.randn(2, 3, size, size), **kwargs).logits
            assert logits.shape == (2, NUM_LABELS)
    assert [len(s.container) for s in stages] == [len(blocks) for blocks, _ in expected]


def test_shortcut_rules_where_blocks_change_shape():
    regnet = find_residual_stages(build("hf_regnet"))
    assert [s.skippable for s in regnet] == [(False, True), (False, True, True), (False, True)]
    mobilenet = find_residual_stages(build("hf_mobilenet_v2"))
    # The paper's bottleneck groups after the stem: 2, 3, 4, 3, 3, 1 blocks, the first of each not residual.
    assert [s.num_blocks for s in mobilenet] == [2, 3, 4, 3, 3, 1]
    assert all(not s.skippable[0] and all(s.skippable[1:]) for s in mobilenet)
    assert [s.name for s in mobilenet][:2] == ["mobilenet_v2.layer[0:2]", "mobilenet_v2.layer[2:5]"]
    convnext = find_residual_stages(build("hf_convnext"))
    # Every block is skippable, but a stage keeps at least one.
    assert [s.max_droppable("prefix") for s in convnext] == [1, 2, 1]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_sampling_never_drops_a_shape_changing_block(name):
    stages = find_residual_stages(build(name))
    for rule in ("prefix", "subset"):
        sampler = SubnetSampler(stages, rule=rule, seed=5)
        for step in range(300):
            subnet = sampler.sample(step)
            for stage, kept in zip(stages, subnet.kept, strict=True):
                dropped = set(range(stage.num_blocks)) - set(kept)
                assert kept and all(stage.skippable[i] for i in dropped), (rule, stage.name, kept)


def test_mobilenet_v2_subnet_runs_exactly_the_kept_blocks():
    model = build("hf_mobilenet_v2").eval()
    stages = find_residual_stages(model)
    flat = model.mobilenet_v2.layer
    blocks = list(flat)
    subnet = subnet_from_depths(stages, [1, 2, 4, 1, 3, 1])
    keep = [0, 2, 3, 5, 6, 7, 8, 9, 12, 13, 14, 15]
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        with use_subnet(stages, subnet):
            assert list(flat) == [blocks[i] for i in keep]
            inside = model(pixel_values=x).logits
        hidden = model.mobilenet_v2.conv_stem(x)
        for i in keep:
            hidden = blocks[i](hidden)
        pooled = model.mobilenet_v2.pooler(model.mobilenet_v2.conv_1x1(hidden)).flatten(1)
        manual = model.classifier(model.dropout(pooled))
    torch.testing.assert_close(inside, manual, rtol=0, atol=1e-6)
    assert list(flat) == blocks and [len(s.container) for s in stages] == [2, 3, 4, 3, 3, 1]
    assert list(flat._modules) == [str(i) for i in range(16)]


def test_model_without_residual_stages_is_refused_by_name():
    model = MobileNetV1ForImageClassification(MobileNetV1Config(depth_multiplier=0.25, num_labels=NUM_LABELS))
    with pytest.raises(
        ModelStructureError,
        match=r"no residual stages found in MobileNetV1ForImageClassification.*register_stage_finder",
    ):
        find_residual_stages(model)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_two_stpp_steps(tmp_path, name):
    model = build(name)
    full_depths = [len(c) for c, _ in expected_stages(name, model)]
    # Swin cannot take smaller inputs: depth sampling only. Elsewhere ST++'s preset 0.43 gives 8..16 px.
    scale = {"min_input_scale": 1.0} if name == "hf_swin" else {}
    args = make_args(tmp_path, stim_method="stpp", num_subnets=2, max_steps=2, per_device_train_batch_size=4, **scale)
    trainer = StimulativeTrainer(model=model, args=args, train_dataset=make_dataset(n=8, size=IMAGE_SIZE))
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "kl_loss" in entry)
    assert log["kl_coef"] == 1.0 and log["kl_loss"] >= 0
    assert torch.isfinite(torch.tensor(log["loss"]))
    assert [len(c) for c, _ in expected_stages(name, model)] == full_depths


def test_swin_refuses_smaller_inputs(tmp_path):
    args = make_args(tmp_path, stim_method="stpp", min_input_scale=0.5)
    with pytest.raises(ConfigError, match=r"min_input_scale=0.5.*SwinForImageClassification.*min_input_scale: 1.0"):
        StimulativeTrainer(model=build("hf_swin"), args=args, train_dataset=make_dataset(n=16, size=IMAGE_SIZE))


@pytest.mark.parametrize(("name", "stride"), [("hf_convnext", 16), ("timm_convnext", 8)])
def test_convnext_inputs_never_below_total_stride(tmp_path, name, stride):
    """ConvNeXt breaks on inputs smaller than its total stride: sampled sizes are raised to it."""
    if name == "hf_convnext":
        model = ConvNextForImageClassification(
            ConvNextConfig(
                num_stages=3, hidden_sizes=[8, 16, 32], depths=[2, 3, 2], patch_size=4, num_labels=NUM_LABELS
            )
        )
        stride = 16
    else:
        model = build(name)
    args = make_args(tmp_path, stim_method="stpp", min_input_scale=0.1)
    trainer = StimulativeTrainer(model=model, args=args, train_dataset=make_dataset(n=8, size=IMAGE_SIZE))
    sizes = {trainer.subnet_sampler.sample(step, image_size=IMAGE_SIZE).input_size for step in range(200)}
    assert min(sizes) == stride and max(sizes) == IMAGE_SIZE


@pytest.mark.parametrize("name", ["hf_vit", "hf_deit"])
def test_vit_inputs_never_below_patch_size(tmp_path, name):
    """A ViT fails on an input smaller than its patch: sampled sizes are raised to the patch size."""
    config_class = ViTConfig if name == "hf_vit" else DeiTConfig
    model_class = ViTForImageClassification if name == "hf_vit" else DeiTForImageClassification
    model = model_class(config_class(**{**VIT_SIZES, "patch_size": 12}, intermediate_size=32, num_labels=NUM_LABELS))
    args = make_args(tmp_path, stim_method="stpp", min_input_scale=0.1)
    trainer = StimulativeTrainer(model=model, args=args, train_dataset=make_dataset(n=8, size=IMAGE_SIZE))
    sizes = {trainer.subnet_sampler.sample(step, image_size=IMAGE_SIZE).input_size for step in range(200)}
    assert min(sizes) == 12 and max(sizes) == IMAGE_SIZE
    logits = model(pixel_values=torch.randn(2, 3, 12, 12), interpolate_pos_encoding=True).logits
    assert logits.shape == (2, NUM_LABELS)

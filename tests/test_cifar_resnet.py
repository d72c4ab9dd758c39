"""Tests of the CIFAR-style ResNets (stim_hf.models.cifar_resnet)."""

from __future__ import annotations

import inspect
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification  # noqa: E402

import stim_hf.models  # noqa: E402
from stim_hf.models import (  # noqa: E402
    CifarResNetConfig,
    CifarResNetForImageClassification,
    CifarResNetModel,
)
from stim_hf.models.cifar_resnet import CifarResNetConfigError, CifarResNetPaddingShortcut  # noqa: E402

torch.manual_seed(0)


def expected_num_params(blocks: list[int], widths: list[int], num_labels: int, shortcut: str, in_ch: int = 3) -> int:
    """Parameter count of a CIFAR ResNet, derived from the architecture by hand."""

    def conv3(cin: int, cout: int) -> int:
        return 9 * cin * cout

    def bn(c: int) -> int:
        return 2 * c

    total = conv3(in_ch, widths[0]) + bn(widths[0])  # stem
    prev = widths[0]
    for s, (n, w) in enumerate(zip(blocks, widths, strict=True)):
        for b in range(n):
            cin = prev if b == 0 else w
            total += conv3(cin, w) + bn(w) + conv3(w, w) + bn(w)
            shape_changes = b == 0 and (s > 0 or cin != w)
            if shape_changes and shortcut == "projection":
                total += cin * w + bn(w)  # 1x1 conv + BN
        prev = w
    return total + widths[-1] * num_labels + num_labels  # classifier


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make(**kwargs) -> CifarResNetForImageClassification:
    kwargs.setdefault("num_labels", 10)
    return CifarResNetForImageClassification(CifarResNetConfig(**kwargs))


# --- architecture ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "shortcut", "known"),
    [
        # Option A values of the well-known reproduction (0.27M / 0.85M in the paper's table 6).
        (20, "padding", 269_722),
        (56, "padding", 853_018),
        # Projection adds 1x1 conv + BN in the two shape-changing blocks: (16*32 + 64) + (32*64 + 128).
        (20, "projection", 269_722 + 2_752),
        (56, "projection", 853_018 + 2_752),
    ],
)
def test_parameter_counts(depth: int, shortcut: str, known: int) -> None:
    n = (depth - 2) // 6
    expected = expected_num_params([n] * 3, [16, 32, 64], 10, shortcut)
    assert expected == known
    assert num_params(make(depth=depth, shortcut=shortcut)) == expected


@pytest.mark.parametrize("shortcut", ["projection", "padding"])
def test_stage_structure(shortcut: str) -> None:
    model = make(depth=32, shortcut=shortcut)
    stages = model.resnet.stages
    assert isinstance(stages, nn.ModuleList) and len(stages) == 3
    for s, stage in enumerate(stages):
        assert isinstance(stage.layers, nn.Sequential)
        assert len(stage.layers) == 5
        for b, block in enumerate(stage.layers):
            changes_shape = s > 0 and b == 0
            assert isinstance(block.shortcut, nn.Identity) == (not changes_shape)
            assert block.has_identity_shortcut == (not changes_shape)
            if changes_shape and shortcut == "projection":
                conv, norm = block.shortcut
                assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
                assert isinstance(norm, nn.BatchNorm2d)
            if changes_shape and shortcut == "padding":
                assert isinstance(block.shortcut, CifarResNetPaddingShortcut)
                assert not list(block.shortcut.parameters())
            # identity shortcut <=> the block keeps its input's shape
            x = torch.randn(2, block.conv1.in_channels, 8, 8)
            assert (block.eval()(x).shape == x.shape) == block.has_identity_shortcut


def test_blocks_per_stage_override() -> None:
    config = CifarResNetConfig(blocks_per_stage=[3, 2, 3], num_labels=10)
    assert config.depth == 18 and config.stage_depths == [3, 2, 3]
    model = CifarResNetForImageClassification(config)
    assert [len(s.layers) for s in model.resnet.stages] == [3, 2, 3]
    assert num_params(model) == expected_num_params([3, 2, 3], [16, 32, 64], 10, "projection")
    # depth is recomputed, whatever was passed
    assert CifarResNetConfig(depth=56, blocks_per_stage=[1, 1, 1]).depth == 8


def test_custom_widths_and_stages() -> None:
    model = make(depth=18, widths=[8, 16, 32, 64], num_channels=1)
    assert [len(s.layers) for s in model.resnet.stages] == [2, 2, 2, 2]
    out = model(torch.randn(2, 1, 32, 32), output_hidden_states=True)
    assert out.logits.shape == (2, 10)
    assert [h.shape[-1] for h in out.hidden_states] == [32, 32, 16, 8, 4]


# --- forward -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shortcut", ["projection", "padding"])
@pytest.mark.parametrize(("size", "final"), [(32, 8), (16, 4), (14, 4), (7, 2)])
def test_forward_shapes(shortcut: str, size: int, final: int) -> None:
    model = make(shortcut=shortcut)
    x = torch.randn(3, 3, size, size)
    out = model(pixel_values=x, output_hidden_states=True)
    assert out.loss is None
    assert out.logits.shape == (3, 10)
    assert len(out.hidden_states) == 4
    assert out.hidden_states[0].shape == (3, 16, size, size)
    assert out.hidden_states[-1].shape == (3, 64, final, final)

    base = model.resnet(x)
    assert base.last_hidden_state.shape == (3, 64, final, final)
    assert base.pooler_output.shape == (3, 64)
    assert base.hidden_states is None
    torch.testing.assert_close(base.pooler_output, base.last_hidden_state.mean(dim=(2, 3)))


def test_resize_input_to_resizes_any_input_before_the_stem() -> None:
    """A model with ``resize_input_to`` runs at that size whatever it is given (a no-op when given that size)."""
    model = make(resize_input_to=14).eval()
    for size in (32, 14, 20):
        hidden = model(pixel_values=torch.randn(2, 3, size, size), output_hidden_states=True).hidden_states
        assert hidden[0].shape == (2, 16, 14, 14)
    x = torch.randn(2, 3, 14, 14)
    plain = make().eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, plain(pixel_values=x).logits)


def test_loss_matches_cross_entropy_and_tuple_output() -> None:
    model = make().eval()
    x = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 3, 9, 3])
    out = model(pixel_values=x, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    loss, logits = model(pixel_values=x, labels=labels, return_dict=False)
    torch.testing.assert_close(logits, out.logits)
    torch.testing.assert_close(loss, out.loss)
    out.loss.backward()
    assert model.resnet.stem.conv.weight.grad is not None


def test_forward_signature_has_no_var_kwargs() -> None:
    """The Trainer must not think the loss is already scaled for gradient accumulation."""
    params = inspect.signature(CifarResNetForImageClassification.forward).parameters
    assert list(params) == ["self", "pixel_values", "labels", "output_hidden_states", "return_dict"]
    assert CifarResNetForImageClassification.accepts_loss_kwargs is False


def test_trainer_does_not_treat_loss_as_scaled(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = Trainer(model=make(depth=8), args=args)
    assert trainer.model_accepts_loss_kwargs is False


# --- initialisation, saving, loading -----------------------------------------------------------------


def test_init_from_config() -> None:
    model = AutoModelForImageClassification.from_config(CifarResNetConfig(depth=56, num_labels=10))
    assert isinstance(model, CifarResNetForImageClassification)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # Kaiming normal, fan_out, relu: std = sqrt(2 / (out_channels * k * k)). Check the big 64-channel
    # convs pooled together (PyTorch's default init would give std ~ 0.024 here, not 0.059).
    big = torch.cat([c.weight.flatten() for c in convs if c.weight.shape == (64, 64, 3, 3)])
    assert big.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)
    assert abs(big.mean().item()) < 0.002
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))
    bound = 1 / math.sqrt(64)
    assert model.classifier.weight.abs().max().item() <= bound
    assert model.classifier.bias.abs().max().item() <= bound
    assert model.classifier.weight.std().item() > 0.5 * bound / math.sqrt(3)


@pytest.mark.parametrize("shortcut", ["projection", "padding"])
def test_save_load_round_trip(tmp_path, shortcut: str) -> None:
    model = make(blocks_per_stage=[2, 1, 2], shortcut=shortcut)
    # move every tensor away from its initial value, BN running statistics included
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.train()
    model(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    logits = model(x).logits

    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not any(f.endswith(".bin") for f in files)

    assert isinstance(AutoConfig.from_pretrained(tmp_path), CifarResNetConfig)
    loaded, info = AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, CifarResNetForImageClassification)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.blocks_per_stage == [2, 1, 2] and loaded.config.shortcut == shortcut
    assert loaded.dtype == torch.float32
    reference = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key  # nothing re-initialised
    loaded.eval()
    assert torch.equal(loaded(x).logits, logits)

    # the base model loads from the classification checkpoint (base_model_prefix = "resnet")
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, CifarResNetModel)
    torch.testing.assert_close(base.eval()(x).pooler_output, model.resnet(x).pooler_output)


def test_registration_is_idempotent() -> None:
    stim_hf.models.register_models()
    stim_hf.models.register_models()
    config = AutoConfig.for_model("cifar_resnet", depth=8)
    assert isinstance(config, CifarResNetConfig)
    assert isinstance(AutoModel.from_config(config), CifarResNetModel)


# --- config validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"depth": 21}, "depth"),
        ({"depth": 2}, "depth"),
        ({"depth": "20"}, "depth"),
        ({"depth": 20, "widths": [16, 32]}, "depth"),  # 2 stages need 4n+2
        ({"widths": []}, "widths"),
        ({"widths": [16, 0, 64]}, "widths"),
        ({"widths": 16}, "widths"),
        ({"blocks_per_stage": [3, 3]}, "blocks_per_stage"),
        ({"blocks_per_stage": [3, 0, 3]}, "blocks_per_stage"),
        ({"num_channels": 0}, "num_channels"),
        ({"shortcut": "B"}, "shortcut"),
        ({"shortcut": "padding", "widths": [32, 16, 64]}, "shortcut"),
        ({"num_labels": 0}, "num_labels"),
        ({"resize_input_to": 0}, "resize_input_to"),
        ({"resize_input_to": 13.5}, "resize_input_to"),
    ],
)
def test_bad_config_raises(kwargs: dict, field: str) -> None:
    with pytest.raises(CifarResNetConfigError, match=field):
        CifarResNetConfig(**kwargs)


def test_depth_error_message_lists_valid_values() -> None:
    with pytest.raises(CifarResNetConfigError) as err:
        CifarResNetConfig(depth=21)
    message = str(err.value)
    assert "depth=21" in message and "6n+2" in message
    assert "20" in message and "26" in message


# --- the contract of the sub-network engine ----------------------------------------------------------


def test_swapping_layers_runs_a_subnetwork() -> None:
    """Replacing a stage's ``layers._modules`` with a subset of blocks runs the shallower network,
    and it computes exactly what a standalone model with those blocks computes."""
    model = make(depth=20).eval()
    x = torch.randn(2, 3, 16, 16)
    full = model(x).logits
    keep = [[0, 1, 2], [0, 2], [0]]

    originals = [stage.layers._modules for stage in model.resnet.stages]
    try:
        for stage, kept in zip(model.resnet.stages, keep, strict=True):
            blocks = list(stage.layers._modules.values())
            stage.layers._modules = {str(i): blocks[j] for i, j in enumerate(kept)}
        assert [len(s.layers) for s in model.resnet.stages] == [3, 2, 1]
        sub = model(x).logits
    finally:
        for stage, modules in zip(model.resnet.stages, originals, strict=True):
            stage.layers._modules = modules
    assert sub.shape == (2, 10)
    assert not torch.allclose(sub, full)
    assert torch.equal(model(x).logits, full)  # restored

    # the same sub-network, exported as a model of its own
    small = make(blocks_per_stage=[3, 2, 1]).eval()
    state = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[1] == "stages":
            s, b = int(parts[2]), int(parts[4])
            if b not in keep[s]:
                continue
            parts[4] = str(keep[s].index(b))
        state[".".join(parts)] = value
    small.load_state_dict(state)
    torch.testing.assert_close(small(x).logits, sub)

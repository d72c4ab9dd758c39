"""The sub-network engine: stage discovery, sampling rules, running a model as a sub-network."""

import re
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

from stim_hf.errors import ConfigError, ModelStructureError
from stim_hf.method import (
    ResidualStage,
    Subnet,
    SubnetSampler,
    find_residual_stages,
    register_stage_finder,
    subnet_from_depths,
    use_subnet,
)
from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification


def hf_resnet(depths=(2, 3, 2), layer_type="basic", seed=0):
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16, 32][: len(depths)],
        depths=list(depths),
        layer_type=layer_type,
        num_labels=5,
    )
    return ResNetForImageClassification(config)


def test_cifar_resnet_stages_match_structure(tiny_cifar_resnet):
    model = tiny_cifar_resnet(depth=20)
    stages = find_residual_stages(model)
    assert [s.name for s in stages] == [f"resnet.stages.{i}.layers" for i in range(3)]
    assert [s.skippable for s in stages] == [(True, True, True), (False, True, True), (False, True, True)]
    # A stage keeps at least one block: the first stage's first block stays although it is an identity block.
    assert [s.max_droppable("prefix") for s in stages] == [2, 2, 2]


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_hf_resnet_stages_match_structure(layer_type):
    model = hf_resnet(depths=(2, 3, 2), layer_type=layer_type)
    stages = find_residual_stages(model)
    assert [s.num_blocks for s in stages] == [2, 3, 2]
    for stage, hf_stage in zip(stages, model.resnet.encoder.stages, strict=True):
        assert stage.container is hf_stage.layers
        for flag, block in zip(stage.skippable, hf_stage.layers, strict=True):
            assert flag == isinstance(block.shortcut, nn.Identity)
    # The first block of every stage changes channels or stride (basic stage 0 has 8 -> 8: identity).
    assert all(not s.skippable[0] for s in stages[1:])


def test_model_without_residual_stages_gets_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ModelStructureError, match=r"no residual stages found in Sequential.*register_stage_finder"):
        find_residual_stages(model)


def test_user_registered_family():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    class MyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block() for _ in range(4)])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    def find(model):
        if not isinstance(model, MyNet):
            return None
        return [ResidualStage("blocks", model.blocks, (True,) * 4)]

    register_stage_finder("test_mynet", find, overwrite=True)
    model = MyNet()
    stages = find_residual_stages(model)
    assert stages[0].container is model.blocks
    x = torch.randn(1, 4, 5, 5)
    with use_subnet(stages, Subnet(kept=((0, 2),), num_blocks=(4,))):
        y = model(x)
    expected = model.blocks[2](model.blocks[0](x))
    torch.testing.assert_close(y, expected)
    assert len(model.blocks) == 4


def _shallower_cifar_copy(model: CifarResNetForImageClassification, subnet: Subnet):
    """A separately built model with only the kept blocks, holding the same weights."""
    config = CifarResNetConfig(**{**model.config.to_dict(), "blocks_per_stage": list(subnet.depths)})
    small = CifarResNetForImageClassification(config)
    mapping = {}
    for s, kept in enumerate(subnet.kept):
        for new_index, old_index in enumerate(kept):
            mapping[f"resnet.stages.{s}.layers.{new_index}."] = f"resnet.stages.{s}.layers.{old_index}."
    full_state = model.state_dict()
    new_state = {}
    for key in small.state_dict():
        source = key
        for new_prefix, old_prefix in mapping.items():
            if key.startswith(new_prefix):
                source = old_prefix + key[len(new_prefix) :]
        new_state[key] = full_state[source]
    small.load_state_dict(new_state)
    return small.eval()


@pytest.mark.parametrize("rule", ["prefix", "subset"])
def test_subnet_forward_equals_shallower_model(tiny_cifar_resnet, rule):
    model = tiny_cifar_resnet(depth=20).eval()
    stages = find_residual_stages(model)
    sampler = SubnetSampler(stages, rule=rule, seed=3)
    x = torch.randn(3, 3, 32, 32)
    checked = 0
    for step in range(40):
        subnet = sampler.sample(step)
        if subnet.is_full:
            continue
        with torch.no_grad(), use_subnet(stages, subnet):
            inside = model(pixel_values=x).logits
        separate = _shallower_cifar_copy(model, subnet)(pixel_values=x).logits
        torch.testing.assert_close(inside, separate, rtol=0, atol=1e-6)
        checked += 1
        if rule == "subset":
            assert any(k != tuple(range(len(k))) for k in subnet.kept) or checked < 40
    assert checked >= 10
    # Restored afterwards: the full network again.
    assert [len(s.container) for s in stages] == [3, 3, 3]


def test_use_subnet_restores_on_error(tiny_cifar_resnet):
    model = tiny_cifar_resnet(depth=20)
    stages = find_residual_stages(model)
    subnet = subnet_from_depths(stages, [1, 1, 1])
    with pytest.raises(RuntimeError), use_subnet(stages, subnet):
        assert [len(s.container) for s in stages] == [1, 1, 1]
        model(pixel_values=torch.randn(1, 5, 8, 8))  # wrong channel count
    assert [len(s.container) for s in stages] == [3, 3, 3]


def test_use_subnet_refuses_to_drop_shape_changing_block():
    model = hf_resnet(depths=(2, 3, 2))
    stages = find_residual_stages(model)
    bad = Subnet(kept=((0, 1), (1, 2), (0, 1)), num_blocks=(2, 3, 2))
    with pytest.raises(ModelStructureError, match="input and output shapes differ"), use_subnet(stages, bad):
        pass
    assert [len(s.container) for s in stages] == [2, 3, 2]


def test_subnet_from_depths_checks_range():
    stages = find_residual_stages(hf_resnet(depths=(2, 3, 2)))
    assert subnet_from_depths(stages, [1, 2, 2]).depths == (1, 2, 2)
    with pytest.raises(ConfigError, match="stage 1 .* must keep between 1 and 3"):
        subnet_from_depths(stages, [1, 0, 2])
    with pytest.raises(ConfigError, match="3 residual stages"):
        subnet_from_depths(stages, [1, 2])


@pytest.mark.parametrize("rule", ["prefix", "subset"])
@pytest.mark.parametrize("space", ["full", [1, 2, 0], [0, 0, 1]])
def test_sampling_bounds_and_coverage(rule, space):
    stages = find_residual_stages(hf_resnet(depths=(3, 4, 2), layer_type="bottleneck"))
    sampler = SubnetSampler(stages, rule=rule, sample_space=space, min_input_scale=0.43, seed=11)
    limits = sampler.space
    dropped_counts = [Counter() for _ in stages]
    sizes = Counter()
    for step in range(3000):
        subnet = sampler.sample(step, image_size=32)
        for s, (stage, kept) in enumerate(zip(stages, subnet.kept, strict=True)):
            dropped = set(range(stage.num_blocks)) - set(kept)
            assert all(stage.skippable[i] for i in dropped), "a shape-changing block was dropped"
            assert len(dropped) <= limits[s]
            assert kept, "a stage lost every block"
            if rule == "prefix":
                assert kept == tuple(range(len(kept)))
            dropped_counts[s][len(dropped)] += 1
        sizes[subnet.input_size] += 1
    # Every allowed number of dropped blocks occurs, roughly as often as the rule says.
    for s, counter in enumerate(dropped_counts):
        assert set(counter) == set(range(limits[s] + 1))
    assert set(sizes) == set(range(13, 33))  # floor(0.43 * 32) = 13, as the released code draws


@pytest.mark.parametrize(
    ("scale", "side", "smallest"), [(0.43, 224, 96), (0.43, 200, 86), (0.43, 32, 13), (0.29, 100, 29)]
)
def test_smallest_input_side_is_the_floor(scale, side, smallest):
    """DESIGN.md 1: r ~ UniformInt[floor(0.43 S), S]; 0.43 x 200 and 0.29 x 100 are exact up to float error."""
    from stim_hf.method.sampling import smallest_input_side

    assert smallest_input_side(scale, side) == smallest


def test_subset_sampling_is_uniform_over_subsets():
    stages = find_residual_stages(hf_resnet(depths=(2, 4, 2)))
    sampler = SubnetSampler(stages, rule="subset", seed=0)
    counts = Counter(sampler.sample(step).kept[1] for step in range(8000))
    # Stage 1: 3 skippable blocks after the kept first one -> 8 subsets, each about 1/8.
    assert len(counts) == 8
    assert all(abs(c / 8000 - 1 / 8) < 0.02 for c in counts.values())


def test_subset_sampling_keeps_a_block_of_a_stage_whose_blocks_are_all_skippable():
    """ResNet-20's first stage (3 identity blocks): 7 subsets, the empty one left out; each block kept 4/7."""
    from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification

    stages = find_residual_stages(CifarResNetForImageClassification(CifarResNetConfig(depth=20, num_labels=10)))
    assert stages[0].skippable == (True, True, True)
    sampler = SubnetSampler(stages, rule="subset", seed=0)
    counts = Counter(sampler.sample(step).kept[0] for step in range(7000))
    assert len(counts) == 7 and () not in counts
    assert all(abs(c / 7000 - 1 / 7) < 0.02 for c in counts.values())
    kept_block_0 = sum(c for kept, c in counts.items() if 0 in kept) / 7000
    assert abs(kept_block_0 - 4 / 7) < 0.02


def test_same_seed_same_sequence_any_rank():
    """Draws depend on (seed, step, micro-step, index) only: ranks agree, resumed runs repeat."""
    stages = find_residual_stages(hf_resnet())
    a = SubnetSampler(stages, "prefix", min_input_scale=0.5, seed=7)
    b = SubnetSampler(stages, "prefix", min_input_scale=0.5, seed=7)
    seq_a = [a.sample(step, micro, k, 64) for step in range(50) for micro in range(2) for k in range(3)]
    # b draws in another order (as a resumed run or another rank would) and gives the same results.
    seq_b = {
        (step, micro, k): b.sample(step, micro, k, 64)
        for step in reversed(range(50))
        for micro in range(2)
        for k in range(3)
    }
    assert seq_a == [seq_b[(step, micro, k)] for step in range(50) for micro in range(2) for k in range(3)]
    c = SubnetSampler(stages, "prefix", min_input_scale=0.5, seed=8)
    assert seq_a != [c.sample(step, micro, k, 64) for step in range(50) for micro in range(2) for k in range(3)]


def test_sample_space_validation():
    stages = find_residual_stages(hf_resnet(depths=(2, 3, 2)))
    with pytest.raises(ConfigError, match=re.escape("has 4 entries but the model has 3")):
        SubnetSampler(stages, sample_space=[0, 1, 1, 1])
    with pytest.raises(ConfigError, match="stage 1 .* can drop at most 2 blocks"):
        SubnetSampler(stages, sample_space=[0, 3, 0])
    with pytest.raises(ConfigError, match="min_input_scale"):
        SubnetSampler(stages, min_input_scale=0.0)


@settings(max_examples=200, deadline=None)
@given(
    depths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    data=st.data(),
)
def test_sampling_property(depths, data):
    """For any stage layout and space, samples respect skippability and bounds."""
    flags = [tuple([data.draw(st.booleans())] + [True] * (n - 1)) for n in depths]
    containers = [nn.Sequential(*[nn.Identity() for _ in range(n)]) for n in depths]
    stages = [ResidualStage(f"s{i}", c, f) for i, (c, f) in enumerate(zip(containers, flags, strict=True))]
    rule = data.draw(st.sampled_from(["prefix", "subset"]))
    limits = [s.max_droppable(rule) for s in stages]
    space = [data.draw(st.integers(0, m)) for m in limits]
    sampler = SubnetSampler(stages, rule=rule, sample_space=space, seed=data.draw(st.integers(0, 2**31)))
    for step in range(20):
        subnet = sampler.sample(step)
        for stage, kept, limit in zip(stages, subnet.kept, space, strict=True):
            dropped = set(range(stage.num_blocks)) - set(kept)
            assert len(dropped) <= limit
            assert all(stage.skippable[i] for i in dropped)
            assert kept

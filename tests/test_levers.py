"""The four levers for the smallest sub-networks (issue 30): sandwich sampling, a size bias of the draws,
zero-initialised residual branches and a learning-rate floor. Each is off by default, and off leaves
training as it was."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from conftest import make_tensor_dataset
from test_families import build
from transformers import TrainerCallback

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments, cli
from stim_hf.errors import ConfigError
from stim_hf.method import SubnetSampler, find_residual_family, find_residual_stages
from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification
from stim_hf.training.modeling import load_saved_classifier

LEVERS_OFF = dict(sandwich=False, subnet_size_bias=0.0, zero_init_residual=False, lr_floor=0.0)


def make_args(tmp_path, **kwargs) -> StimulativeTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=123,
        use_cpu=True,
        disable_tqdm=True,
        stim_method="stpp",
        min_input_scale=0.5,
    )
    return StimulativeTrainingArguments(**(defaults | kwargs))


def cifar_resnet(depth: int = 14) -> CifarResNetForImageClassification:
    torch.manual_seed(0)
    return CifarResNetForImageClassification(CifarResNetConfig(depth=depth, widths=[8, 16, 32], num_labels=10))


def record_subnets(trainer: StimulativeTrainer) -> list[tuple[int, object]]:
    """Every sub-network the trainer runs, with the optimizer step it runs in."""
    seen = []
    original = trainer.subnet_kl

    def recording(model, pixel_values, teacher_logits, subnet):
        seen.append((trainer.state.global_step, subnet))
        return original(model, pixel_values, teacher_logits, subnet)

    trainer.subnet_kl = recording
    return seen


def train_logs(trainer: StimulativeTrainer) -> list[dict]:
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# -- off by default: the draws and the losses of before ------------------------------------------------

# Recorded before the levers existed: SubnetSampler on a CIFAR ResNet-20, seed 7, steps 0-2 x micro-steps 0-1 x
# indices 0-1, batch side 16, min_input_scale 0.5, smallest side 8.
TODAYS_DRAWS = {
    "prefix": [
        "depths=3,1,3/3,3,3 size=8", "depths=1,2,2/3,3,3 size=8", "depths=3,3,1/3,3,3 size=11",
        "depths=3,2,1/3,3,3 size=16", "depths=3,3,1/3,3,3 size=11", "depths=1,3,1/3,3,3 size=14",
        "depths=1,1,2/3,3,3 size=8", "depths=3,3,3/3,3,3 size=10", "depths=1,1,1/3,3,3 size=14",
        "depths=3,1,3/3,3,3 size=13", "depths=3,3,2/3,3,3 size=13", "depths=2,1,3/3,3,3 size=11",
    ],
    "subset": [
        "depths={1},1,3/3,3,3 size=14", "depths={0,2},3,3/3,3,3 size=8", "depths=2,1,1/3,3,3 size=11",
        "depths=2,2,1/3,3,3 size=11", "depths=2,{0,2},3/3,3,3 size=16", "depths=2,2,{0,2}/3,3,3 size=10",
        "depths={2},3,{0,2}/3,3,3 size=12", "depths=3,3,2/3,3,3 size=16", "depths=1,{0,2},1/3,3,3 size=9",
        "depths={2},{0,2},2/3,3,3 size=16", "depths=3,2,1/3,3,3 size=13", "depths={2},{0,2},2/3,3,3 size=8",
    ],
}  # fmt: skip
# Recorded before the levers existed: make_args(num_subnets=2), ResNet-14 (seed 0), make_tensor_dataset(n=64).
TODAYS_RUN_DRAWS = [
    "depths=1,2,2/2,2,2 size=14", "depths=1,1,2/2,2,2 size=10", "depths=1,1,1/2,2,2 size=12",
    "depths=1,2,1/2,2,2 size=13", "depths=2,1,1/2,2,2 size=11", "depths=1,2,2/2,2,2 size=11",
]  # fmt: skip
TODAYS_RUN_LOSSES = [2.673679828643799, 2.3405370712280273, 2.5143837928771973]


@pytest.mark.parametrize("rule", ["prefix", "subset"])
def test_the_default_sampler_draws_what_it_drew_before(rule):
    stages = find_residual_stages(cifar_resnet(depth=20))
    sampler = SubnetSampler(stages, rule=rule, min_input_scale=0.5, seed=7, min_input_size=8, size_bias=0.0)
    draws = [sampler.sample(step, micro, index, image_size=16) for step in range(3) for micro in range(2) for index in range(2)]  # fmt: skip
    assert [subnet.describe() for subnet in draws] == TODAYS_DRAWS[rule]


def test_a_run_with_the_levers_off_is_the_run_of_before(tmp_path):
    runs = []
    for levers in ({}, LEVERS_OFF):
        trainer = StimulativeTrainer(
            model=cifar_resnet(), args=make_args(tmp_path, num_subnets=2, **levers), train_dataset=make_tensor_dataset()
        )
        seen = record_subnets(trainer)
        logs = train_logs(trainer)
        assert [subnet.describe() for _, subnet in seen] == TODAYS_RUN_DRAWS
        assert [log["loss"] for log in logs] == pytest.approx(TODAYS_RUN_LOSSES, rel=1e-4)
        assert "smallest_kl_loss" not in logs[0]
        runs.append([log["loss"] for log in logs])
    assert runs[0] == runs[1]


# -- 1. sandwich sampling -------------------------------------------------------------------------------


def test_the_smallest_sub_network_of_each_rule_and_space():
    stages = find_residual_stages(cifar_resnet(depth=20))  # 3 blocks per stage; stage 0's are all skippable
    prefix = SubnetSampler(stages, "prefix", min_input_scale=0.5, min_input_size=8)
    assert prefix.smallest(image_size=32).kept == ((0,), (0,), (0,)) and prefix.smallest(32).input_size == 16
    assert prefix.smallest(image_size=12).input_size == 8  # never below the smallest side the draws allow
    assert prefix.smallest().input_size is None
    assert SubnetSampler(stages, "prefix", sample_space=[0, 1, 2]).smallest(32).depths == (3, 2, 1)
    assert SubnetSampler(stages, "prefix", sample_space=[0, 1, 2]).smallest(32).input_size is None  # scale 1
    # Subset rule, full space: only the blocks that change shape stay (a stage of skippable blocks keeps its first).
    assert SubnetSampler(stages, "subset").smallest().kept == ((0,), (0,), (0,))
    # A smaller space drops the last skippable blocks.
    assert SubnetSampler(stages, "subset", sample_space=[1, 1, 0]).smallest().kept == ((0, 1), (0, 1), (0, 1, 2))


def test_sandwich_trains_the_smallest_sub_network_after_the_random_ones_every_step(tmp_path):
    args = make_args(tmp_path, num_subnets=2, sandwich=True, max_steps=3, gradient_accumulation_steps=2)
    trainer = StimulativeTrainer(model=cifar_resnet(), args=args, train_dataset=make_tensor_dataset())
    seen = record_subnets(trainer)
    logs = train_logs(trainer)
    smallest = trainer.subnet_sampler.smallest(image_size=16)
    assert smallest.depths == (1, 1, 1) and smallest.input_size == 8
    sampler = trainer.subnet_sampler
    for step in range(3):
        subnets = [subnet for at, subnet in seen if at == step]
        # Two micro-batches, each: its 2 random draws (those of a run without sandwich), then the smallest.
        assert subnets == [
            *(sampler.sample(step, 0, index, image_size=16) for index in range(2)),
            smallest,
            *(sampler.sample(step, 1, index, image_size=16) for index in range(2)),
            smallest,
        ]
    for log in logs:
        # The smallest's KL is summed like the others': loss = CE + lambda * (2 + 1) * mean KL.
        assert log["loss"] == pytest.approx(log["ce_loss"] + 3 * log["kl_loss"], rel=1e-4)
        assert log["smallest_kl_loss"] > 0


def test_sandwich_without_random_sub_networks_trains_only_the_smallest(tmp_path):
    args = make_args(tmp_path, num_subnets=0, sandwich=True)
    assert args.uses_subnets
    trainer = StimulativeTrainer(model=cifar_resnet(), args=args, train_dataset=make_tensor_dataset())
    seen = record_subnets(trainer)
    logs = train_logs(trainer)
    assert [at for at, _ in seen] == [0, 1, 2]
    for log in logs:  # logged as the sub-network metrics are: depth fraction and input size of what ran
        assert log["subnet_depth_fraction"] == 0.5 and log["subnet_input_size"] == 8
        assert log["smallest_kl_loss"] == pytest.approx(log["kl_loss"])
        assert log["loss"] == pytest.approx(log["ce_loss"] + log["kl_loss"], rel=1e-4)


def test_sandwich_sequential_backward_equals_summed(tmp_path):
    weights = []
    for strategy in ("summed", "sequential"):
        model = cifar_resnet()
        args = make_args(tmp_path, num_subnets=1, sandwich=True, backward_strategy=strategy, max_steps=1)
        StimulativeTrainer(model=model, args=args, train_dataset=make_tensor_dataset()).train()
        weights.append(model.resnet.stages[2].layers[0].conv1.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-6)


def test_common_training_with_sandwich_is_refused():
    with pytest.raises(ConfigError, match="stim_method='ct' .* num_subnets=0 and sandwich=true and kl_coef=1.0"):
        StimulativeTrainingArguments(output_dir="unused", stim_method="ct", sandwich=True, use_cpu=True)


# -- 2. the size bias --------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["prefix", "subset"])
def test_the_size_bias_moves_the_draws_toward_smaller_depths_and_inputs(rule):
    stages = find_residual_stages(cifar_resnet(depth=20))  # 3 depths per stage: keep 1, 2 or 3 blocks
    stats = {}
    for bias in (0.0, 0.5, 0.9):
        sampler = SubnetSampler(stages, rule, min_input_scale=0.5, min_input_size=8, seed=3, size_bias=bias)
        draws = [sampler.sample(step, image_size=16) for step in range(3000)]
        stats[bias] = {
            "depth": sum(d.depth_fraction for d in draws) / len(draws),
            "size": sum(d.input_size for d in draws) / len(draws),
            "shallowest": Counter(d.depths[1] for d in draws)[1] / len(draws),
            "smallest size": sum(d.input_size == 8 for d in draws) / len(draws),
        }
    # Uniform: depth fraction 2/3 (prefix), input 8..16 mean 12; the bias lowers both, more with more bias.
    assert stats[0.0]["depth"] > stats[0.5]["depth"] + 0.08 > stats[0.9]["depth"] + 0.16
    assert stats[0.0]["size"] > stats[0.5]["size"] + 1.0 > stats[0.9]["size"] + 2.0
    # Documented: P(the smallest choice) = G_0 ** (1 - bias). Input sizes: 9 equally likely, G_0 = 1/9.
    for bias in (0.0, 0.5, 0.9):
        assert stats[bias]["smallest size"] == pytest.approx((1 / 9) ** (1 - bias), abs=0.04)
    if rule == "prefix":  # 3 equally likely depths: G_0 = 1/3
        for bias in (0.0, 0.5, 0.9):
            assert stats[bias]["shallowest"] == pytest.approx((1 / 3) ** (1 - bias), abs=0.04)


def test_biased_draws_are_reproducible_from_seed_and_counters():
    stages = find_residual_stages(cifar_resnet())
    draw = [
        SubnetSampler(stages, min_input_scale=0.5, seed=seed, size_bias=0.7).sample(5, 1, 2, image_size=16)
        for seed in (4, 4)
    ]
    assert draw[0] == draw[1]
    many = {SubnetSampler(stages, seed=4, size_bias=0.7).sample(step, 0, 0) for step in range(40)}
    assert len(many) > 1  # still random


def test_the_trainer_biases_its_training_draws_only(tmp_path):
    plain = StimulativeTrainer(model=cifar_resnet(), args=make_args(tmp_path), train_dataset=make_tensor_dataset())
    biased = StimulativeTrainer(
        model=cifar_resnet(), args=make_args(tmp_path, subnet_size_bias=0.9), train_dataset=make_tensor_dataset()
    )
    assert biased.subnet_sampler.size_bias == 0.9
    # The fixed evaluation sub-networks, which make runs comparable, stay those of the uniform rule.
    assert biased.fixed_subnets(3) == plain.fixed_subnets(3)
    logs = train_logs(biased)
    assert all(log["subnet_depth_fraction"] < 1 for log in logs)


# -- 3. zero-initialised residual branches ---------------------------------------------------------


def last_norm_weights(model) -> list[torch.Tensor]:
    family, stages = find_residual_family(model)
    return [family.last_branch_norm(block).weight.detach().clone() for s in stages for block in s.container]


class WeightsAtStart(TrainerCallback):
    def __init__(self):
        self.weights = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = last_norm_weights(model)


@pytest.mark.parametrize("family", ["cifar_resnet", "hf_resnet", "hf_regnet", "timm_resnet"])
def test_zero_init_residual_zeroes_every_branchs_last_batchnorm_at_step_0(tmp_path, family):
    model = build(family)
    before = last_norm_weights(model)
    assert all(bool((w != 0).all()) for w in before)  # a fresh model's are 1 (timm's own zero_init_last too)
    trainer = StimulativeTrainer(model=model, args=make_args(tmp_path, zero_init_residual=True))
    weights = last_norm_weights(model)
    assert len(weights) == sum(s.num_blocks for s in trainer.stages)
    assert all(bool((w == 0).all()) for w in weights)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert any(bool((m.weight != 0).all()) for m in norms)  # the other BatchNorms are left as they were


def test_zero_init_residual_holds_when_training_starts_and_only_once(tmp_path):
    model, start = cifar_resnet(), WeightsAtStart()
    args = make_args(tmp_path, zero_init_residual=True, max_steps=2)
    StimulativeTrainer(model=model, args=args, train_dataset=make_tensor_dataset(), callbacks=[start]).train()
    assert all(bool((w == 0).all()) for w in start.weights)
    trained = last_norm_weights(model)
    assert any(bool((w != 0).any()) for w in trained)  # training moved them
    StimulativeTrainer(model=model, args=args)  # a second trainer on the trained model leaves it alone
    assert all(torch.equal(a, b) for a, b in zip(trained, last_norm_weights(model), strict=True))


def test_zero_init_residual_is_off_by_default(tmp_path):
    model = cifar_resnet()
    StimulativeTrainer(model=model, args=make_args(tmp_path))
    assert all(bool((w == 1).all()) for w in last_norm_weights(model))


def test_zero_init_residual_is_refused_for_a_family_without_one_and_for_a_pretrained_model(tmp_path):
    with pytest.raises(ConfigError) as error:
        StimulativeTrainer(model=build("hf_convnext"), args=make_args(tmp_path, zero_init_residual=True))
    message = str(error.value)
    assert message.startswith("zero_init_residual=true: ConvNextForImageClassification (hf_convnext family) has no")
    assert "cifar_resnet" in message and "set zero_init_residual: false" in message and "\n" not in message
    cifar_resnet().save_pretrained(tmp_path / "pretrained")
    pretrained = load_saved_classifier(tmp_path / "pretrained")
    with pytest.raises(
        ConfigError, match="zero_init_residual=true would zero .* of the pretrained model '.*pretrained'"
    ):
        StimulativeTrainer(model=pretrained, args=make_args(tmp_path, zero_init_residual=True))


def test_the_command_line_refuses_zero_init_of_a_pretrained_model_before_loading_data(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model_name_or_path: someone/resnet\ndataset_name: no/such-dataset\nzero_init_residual: true\n"
        f"output_dir: {tmp_path / 'out'}\nuse_cpu: true\nreport_to: none\n"
    )
    assert cli.main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stim-hf: error: zero_init_residual=true would zero the last BatchNorm weight"), err
    assert "'someone/resnet'" in err and len(err.strip().splitlines()) == 1


# -- 4. the learning-rate floor ------------------------------------------------------------------------


def test_lr_floor_keeps_the_cosine_schedule_above_the_floor(tmp_path):
    lowest = {}
    for floor in (0.0, 0.25):
        args = make_args(
            tmp_path, stim_method="ct", learning_rate=0.1, lr_scheduler_type="cosine", max_steps=8, lr_floor=floor
        )
        rates = [log["learning_rate"] for log in train_logs(StimulativeTrainer(model=cifar_resnet(), args=args, train_dataset=make_tensor_dataset(n=128)))]  # fmt: skip
        assert len(rates) == 8
        lowest[floor] = min(rates)
    assert lowest[0.25] >= 0.25 * 0.1 * (1 - 1e-9)
    assert lowest[0.0] < 0.25 * 0.1 * 0.5  # without the floor the same schedule goes well below it


def test_lr_floor_maps_to_transformers_cosine_with_min_lr():
    args = StimulativeTrainingArguments(
        output_dir="unused",
        use_cpu=True,
        lr_scheduler_type="cosine",
        lr_floor=0.1,
        lr_scheduler_kwargs={"num_cycles": 0.5},
    )
    assert str(args.lr_scheduler_type.value) == "cosine_with_min_lr"
    assert args.lr_scheduler_kwargs == {"num_cycles": 0.5, "min_lr_rate": 0.1}
    # Read back from a run's training_args.json, the arguments hold the same schedule (idempotent).
    again = StimulativeTrainingArguments(
        output_dir="unused",
        use_cpu=True,
        lr_scheduler_type=args.lr_scheduler_type,
        lr_scheduler_kwargs=args.lr_scheduler_kwargs,
        lr_floor=0.1,
    )
    assert again.lr_scheduler_type == args.lr_scheduler_type and again.lr_scheduler_kwargs == args.lr_scheduler_kwargs
    off = StimulativeTrainingArguments(output_dir="unused", use_cpu=True, lr_scheduler_type="cosine")
    assert str(off.lr_scheduler_type.value) == "cosine" and not off.lr_scheduler_kwargs


# -- bad values, refused at parse in one line (docs/reliability.md, 22b-22h) ----------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"subnet_size_bias": 1.0}, r"subnet_size_bias=1.0 is out of range; valid: [0.0, 1.0)"),
        ({"subnet_size_bias": -0.5}, r"subnet_size_bias=-0.5 is out of range; valid: [0.0, 1.0)"),
        ({"subnet_size_bias": "some"}, r"subnet_size_bias='some' must be a number in [0.0, 1.0)"),
        ({"lr_floor": 1.0}, r"lr_floor=1.0 is out of range; valid: [0.0, 1.0)"),
        ({"lr_floor": math.nan}, r"lr_floor=nan must be a number in [0.0, 1.0)"),
        ({"sandwich": "yes"}, "sandwich='yes' must be true or false"),
        ({"zero_init_residual": 1}, "zero_init_residual=1 must be true or false"),
        (
            {"lr_floor": 0.1},  # TrainingArguments' default schedule is linear
            "lr_floor=0.1 cannot apply to lr_scheduler_type='linear'; it takes a cosine schedule: cosine, "
            "cosine_with_min_lr, cosine_warmup_with_min_lr (or set lr_floor: 0)",
        ),
        (
            {"lr_floor": 0.1, "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1e-4}},
            "lr_floor=0.1 and lr_scheduler_kwargs {'min_lr': 0.0001} both set the schedule's floor; keep one "
            "(lr_floor is min_lr_rate, a share of learning_rate)",
        ),
    ],
)
def test_bad_lever_values_are_refused_at_parse_in_one_line(values, message):
    with pytest.raises(ConfigError) as error:
        StimulativeTrainingArguments(output_dir="unused", use_cpu=True, report_to="none", **values)
    assert str(error.value) == message

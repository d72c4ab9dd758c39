"""Multi-resolution training of the full network (``full_input_scale``, issue 41): the full network's input side is
drawn each step by the sub-networks' size rule, from the seed and the step, in a stream of its own."""

from __future__ import annotations

import pytest
from conftest import make_tensor_dataset
from test_families import IMAGE_SIZE, build, make_dataset
from test_levers import cifar_resnet, make_args, record_subnets

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments
from stim_hf.errors import ConfigError
from stim_hf.method import FULL_INPUT_STREAM, SubnetSampler, find_residual_stages


def full_network_sides(trainer: StimulativeTrainer) -> list[tuple[bool, int]]:
    """(training?, input side) of every full-network forward (sub-network passes left out)."""
    seen: list[tuple[bool, int]] = []
    original = trainer.subnet_kl
    inside_subnet = []

    def recording_subnet_kl(*args, **kwargs):
        inside_subnet.append(True)
        try:
            return original(*args, **kwargs)
        finally:
            inside_subnet.pop()

    def hook(module, args, kwargs):
        if not inside_subnet:
            seen.append((module.training, kwargs["pixel_values"].shape[-2]))

    trainer.subnet_kl = recording_subnet_kl
    trainer.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_ct_full_network_trains_at_the_drawn_sizes_and_evaluates_at_its_own(tmp_path):
    data = make_tensor_dataset(n=48, size=32)
    args = make_args(
        tmp_path, stim_method="ct", min_input_scale=None, full_input_scale=0.43, max_steps=6, eval_strategy="steps",
        eval_steps=6, per_device_eval_batch_size=16,
    )  # fmt: skip
    trainer = StimulativeTrainer(model=cifar_resnet(), args=args, train_dataset=data, eval_dataset=data)
    sides = full_network_sides(trainer)
    trainer.train()
    trained = [side for training, side in sides if training]
    evaluated = [side for training, side in sides if not training]
    stages = find_residual_stages(trainer.model)
    draws = SubnetSampler(stages, min_input_scale=0.43, seed=123, min_input_size=8, stream=FULL_INPUT_STREAM)
    assert trained == [draws.sample(step, 0, 0, image_size=32).input_size for step in range(6)]
    assert all(13 <= side <= 32 for side in trained) and len(set(trained)) > 1  # floor(0.43 * 32) = 13
    assert evaluated and set(evaluated) == {32}
    logs = [entry for entry in trainer.state.log_history if "full_input_size" in entry]
    assert [entry["full_input_size"] for entry in logs] == trained


def test_off_by_default_and_at_one(tmp_path):
    assert StimulativeTrainingArguments(output_dir=str(tmp_path), use_cpu=True).full_input_scale == 1.0
    args = make_args(tmp_path, stim_method="ct", min_input_scale=None, full_input_scale=1.0, max_steps=2)
    trainer = StimulativeTrainer(model=cifar_resnet(), args=args, train_dataset=make_tensor_dataset(n=32, size=16))
    sides = full_network_sides(trainer)
    trainer.train()
    assert trainer.full_input_sampler is None and {side for _, side in sides} == {16}
    assert not any("full_input_size" in entry for entry in trainer.state.log_history)


def test_subnet_draws_unchanged_by_it(tmp_path):
    """ST++ with the full network at drawn sizes runs the same sub-networks as without: the draws are independent."""
    runs = []
    for scale in (1.0, 0.5):
        args = make_args(tmp_path / str(scale), num_subnets=2, full_input_scale=scale, max_steps=3)
        trainer = StimulativeTrainer(model=cifar_resnet(), args=args, train_dataset=make_tensor_dataset(n=48, size=16))
        seen = record_subnets(trainer)
        trainer.train()
        runs.append([(step, subnet.describe()) for step, subnet in seen])
    assert runs[0] == runs[1] and len(runs[0]) == 6


def test_same_draws_for_the_same_seed_and_step_on_every_trainer(tmp_path):
    """Every process derives the size from (seed, step, micro-step): two trainers with one seed agree."""
    sizes = []
    for name in ("a", "b"):
        args = make_args(tmp_path / name, stim_method="ct", min_input_scale=None, full_input_scale=0.43, max_steps=4)
        trainer = StimulativeTrainer(model=cifar_resnet(), args=args, train_dataset=make_tensor_dataset(n=32, size=32))
        sides = full_network_sides(trainer)
        trainer.train()
        sizes.append(sides)
    assert sizes[0] == sizes[1]


def test_learns_at_every_size(tmp_path):
    """A ResNet trained at random sizes learns: its training loss falls by a wide margin."""
    data = make_tensor_dataset(n=128, size=32)
    args = make_args(
        tmp_path, stim_method="ct", min_input_scale=None, full_input_scale=0.43, max_steps=80, logging_steps=20,
        learning_rate=0.1,
    )  # fmt: skip
    trainer = StimulativeTrainer(model=cifar_resnet(), args=args, train_dataset=data)
    trainer.train()
    losses = [entry["ce_loss"] for entry in trainer.state.log_history if "ce_loss" in entry]
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0.0, r"full_input_scale=0.0 is out of range; valid: (0.0, 1.0]"),
        (1.5, r"full_input_scale=1.5 is out of range; valid: (0.0, 1.0]"),
        ("half", r"full_input_scale='half' must be a number in (0.0, 1.0]"),
    ],
)
def test_bad_values_refused_at_parse(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        StimulativeTrainingArguments(output_dir=str(tmp_path), use_cpu=True, full_input_scale=value)


def test_model_that_cannot_run_smaller_inputs_refused_before_training(tmp_path):
    args = make_args(tmp_path, stim_method="ct", min_input_scale=None, full_input_scale=0.5)
    with pytest.raises(ConfigError, match=r"full_input_scale=0.5: SwinForImageClassification.*full_input_scale: 1.0"):
        StimulativeTrainer(model=build("hf_swin"), args=args, train_dataset=make_dataset(n=16, size=IMAGE_SIZE))


def test_resume_with_another_scale_is_named(tmp_path):
    from stim_hf.training.checkpointing import RESUME_SENSITIVE_ARGUMENTS

    assert "full_input_scale" in RESUME_SENSITIVE_ARGUMENTS


def test_command_line_and_yaml_take_it(tmp_path):
    from stim_hf.cli.train import parse_train_args

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_type: cifar_resnet\ndataset_name: sklearn:digits\nstim_method: ct\nfull_input_scale: 0.43\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    args = parse_train_args([str(recipe), "--full_input_scale", "0.6"])
    training = next(a for a in args if isinstance(a, StimulativeTrainingArguments))
    assert training.full_input_scale == 0.6

"""The per-step model walks made cheap: cached lists per model, the skipped redundant ``model.train()``."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import make_tensor_dataset
from torch import nn

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments
from stim_hf.method.batchnorm import batchnorm_layers, frozen_running_stats
from stim_hf.training.model_walks import (
    ModelWalks,
    all_modules_training,
    fast_zero_grad_once,
    redundant_train_call_skipped,
    remove_pending_shadows,
)
from stim_hf.training.reliable_trainer import HostScalar


class CountingTrain(nn.Module):
    """Counts how often nn.Module.train reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.calls = 0

    def train(self, mode: bool = True) -> nn.Module:
        self.calls += 1
        return super().train(mode)


def test_all_modules_training_sees_a_nested_module_in_eval_mode(tiny_cifar_resnet):
    model = tiny_cifar_resnet().train()
    assert all_modules_training(model)
    batchnorm_layers(model)[-1].eval()
    assert not all_modules_training(model)


def test_train_call_is_skipped_only_when_nothing_would_change():
    model = nn.Sequential(CountingTrain(), nn.BatchNorm1d(2)).train()
    inner = model[0]
    inner.calls = 0
    with redundant_train_call_skipped(model):
        assert model.train() is model
        assert inner.calls == 0 and "train" not in vars(model)  # one-shot: the next call is the real one
        model.train()
        assert inner.calls == 1
    assert "train" not in vars(model)

    model[1].eval()
    with redundant_train_call_skipped(model):
        model.train()
    assert inner.calls == 2 and model[1].training

    with redundant_train_call_skipped(model):
        model.eval()  # not skipped: eval is a change
        assert not model[1].training and not inner.training
    assert "train" not in vars(model)


def test_train_call_shadow_is_removed_when_the_block_raises():
    model = nn.Linear(2, 2).train()
    with pytest.raises(RuntimeError), redundant_train_call_skipped(model):
        raise RuntimeError("boom")
    assert "train" not in vars(model)


def test_fast_zero_grad_replaces_the_next_call_only():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    parameters = list(model.parameters())

    def backward() -> None:
        model(torch.ones(1, 2)).sum().backward()

    backward()
    fast_zero_grad_once(model, parameters)
    fast_zero_grad_once(model, parameters)  # already pending: no second shadow
    assert "zero_grad" in vars(model)
    model.zero_grad()
    assert all(p.grad is None for p in parameters) and "zero_grad" not in vars(model)
    backward()
    fast_zero_grad_once(model, parameters)
    model.zero_grad(set_to_none=False)  # the model's own method, as asked
    assert all(p.grad is not None and not p.grad.any() for p in parameters) and "zero_grad" not in vars(model)


def test_an_attribute_the_user_set_is_never_removed():
    """shadow_once leaves a user's own instance ``zero_grad`` alone, and so does the clean-up after a run."""
    model = nn.Linear(2, 2)
    calls = []
    model.zero_grad = lambda set_to_none=True: calls.append(set_to_none)  # the user's, on this instance
    fast_zero_grad_once(model, list(model.parameters()))
    remove_pending_shadows(model)
    model.zero_grad()
    assert calls == [True] and "zero_grad" in vars(model)
    with redundant_train_call_skipped(model):
        model.train = lambda mode=True: model  # set by the user inside the block, after the shortcut
    assert "train" in vars(model)


def test_model_walks_are_taken_once_per_model_and_retaken_for_another(tiny_cifar_resnet):
    walks = ModelWalks()
    first = tiny_cifar_resnet()
    params = walks.parameters(first)
    assert params is walks.parameters(first)
    assert [id(p) for p in params] == [id(p) for p in first.parameters()]
    assert walks.batchnorm_layers(first) == batchnorm_layers(first)
    second = tiny_cifar_resnet()
    assert {id(p) for p in walks.parameters(second)}.isdisjoint(id(p) for p in params)
    del first, params
    gc.collect()
    assert len(walks._lists) == 1  # a dropped model's lists go with it


def test_frozen_running_stats_takes_a_kept_list_of_layers(tiny_cifar_resnet):
    model = tiny_cifar_resnet().train()
    layers = batchnorm_layers(model)
    before = [layer.running_mean.clone() for layer in layers]
    with frozen_running_stats(layers):
        assert not any(layer.track_running_stats for layer in layers)
        model(pixel_values=torch.randn(4, 3, 16, 16))
    assert all(layer.track_running_stats for layer in layers)
    assert all(torch.equal(a, layer.running_mean) for a, layer in zip(before, layers, strict=True))


def test_host_scalar_reads_a_device_scalar():
    assert HostScalar(torch.tensor(3)).get() == 3
    if torch.cuda.is_available():
        assert HostScalar(torch.tensor(2.5, device="cuda")).get() == 2.5


def test_training_steps_skip_the_trainers_redundant_train_walk(tmp_path, tiny_cifar_resnet):
    """A real run: the Trainer's per-step model.train() no longer walks the model, evaluation still switches modes."""
    calls = []
    model = tiny_cifar_resnet()
    original = type(model.resnet).train

    def spy(module, mode=True):
        calls.append(mode)
        return original(module, mode)

    model.resnet.train = spy.__get__(model.resnet)
    args = StimulativeTrainingArguments(
        output_dir=str(tmp_path), stim_method="stpp", per_device_train_batch_size=8, max_steps=4, use_cpu=True,
        report_to="none", save_strategy="no", eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8,
        num_eval_subnets=0, disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    data = make_tensor_dataset(n=32)
    StimulativeTrainer(model=model, args=args, train_dataset=data, eval_dataset=data).train()
    # Without the skip: [True, True, False, True, True, False] (steps 1, 2, eval, steps 3, 4, eval).
    # With it, the walk runs only when evaluation had switched modes: on step 3.
    assert calls == [False, True, False]
    assert all(p.grad is None for p in model.parameters())  # zeroed after the last step, by the kept list
    assert "zero_grad" not in vars(model) and "train" not in vars(model)

"""The walks over a model that a training step repeats, done once or made cheap.

A training step of a ResNet-56 asks for its parameters (gradient norm, clipping, zeroing), its
BatchNorm layers (each sub-network pass freezes their statistics) and calls ``model.train()``:
each is a walk over 208 modules, 0.1 to 0.8 ms on a CPU. On a GPU the step of a CIFAR ResNet is
bound by the host, so those walks are step time (docs/benchmarks.md, framework overhead).

What pays for the patching here, measured on CIFAR ResNet-56 (µs per call
before and now; record in ``docs/measurements/cpu_2026-11-26b/``, by a script since retired: bench/README.md), ``model.train()`` 488.8 and 70.0, ``model.zero_grad()`` 261.2 and 10.8, freezing
the BatchNorm statistics of a sub-network pass 310.2 and 13.6 (docs/architecture.md).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from stim_hf.method.batchnorm import batchnorm_layers

# Marks the instance attributes shadow_once sets, so that only those are ever removed.
_SHADOW_MARK = "_stim_hf_shadow"


class ModelWalks:
    """Lists of a model's parameters and BatchNorm layers, taken once per model object.

    Kept per model object (weakly: a replaced model, e.g. by ``model_init``, gets new lists). The
    lists assume the model's modules are not replaced during training; sub-network passes only
    hide blocks for a while (:func:`~stim_hf.method.use_subnet`), which leaves them valid.
    """

    def __init__(self) -> None:
        self._lists: weakref.WeakKeyDictionary[nn.Module, dict[str, list]] = weakref.WeakKeyDictionary()

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """``list(model.parameters())``, listed on first use."""
        lists = self._lists.setdefault(model, {})
        if "parameters" not in lists:
            lists["parameters"] = list(model.parameters())
        return lists["parameters"]

    def batchnorm_layers(self, model: nn.Module) -> list[_BatchNorm]:
        """The BatchNorm layers of ``model`` that track running statistics, listed on first use."""
        lists = self._lists.setdefault(model, {})
        if "batchnorm" not in lists:
            lists["batchnorm"] = batchnorm_layers(model)
        return lists["batchnorm"]


def all_modules_training(model: nn.Module) -> bool:
    """Whether ``model`` and every module inside it are in training mode (a read-only walk, ~30 us for 208 modules)."""
    if not model.training:
        return False
    return all(child is None or all_modules_training(child) for child in model._modules.values())


def shadow_once(model: nn.Module, name: str, replacement: Callable[..., Any]) -> bool:
    """Make the next ``model.<name>(...)`` call ``replacement`` instead; later calls reach the model's own method.

    An instance attribute shadows the class's method for this object only, and removes itself
    when called. Returns False (and changes nothing) if ``name`` is already shadowed.
    """
    if name in vars(model):
        return False

    def once(*args: Any, **kwargs: Any) -> Any:
        _remove_shadow(model, name)
        return replacement(*args, **kwargs)

    setattr(once, _SHADOW_MARK, True)
    object.__setattr__(model, name, once)
    return True


def _remove_shadow(model: nn.Module, name: str) -> None:
    """Remove ``model.<name>`` if it is one of :func:`shadow_once`'s, never an attribute the user set."""
    if getattr(vars(model).get(name), _SHADOW_MARK, False):
        del vars(model)[name]


@contextmanager
def redundant_train_call_skipped(model: nn.Module) -> Iterator[None]:
    """Inside the block, the first ``model.train()`` returns at once if every module already trains.

    ``Trainer.training_step`` starts with ``model.train()``, which sets the mode of every module
    one by one (0.5 to 0.8 ms for a ResNet-56 on a CPU); when nothing would change, a read-only
    check suffices. Only that first call is skipped, and only with ``mode=True``: any other call
    (``eval()``, a second ``train()``) goes to the model's own ``train``.
    """
    if not all_modules_training(model) or not shadow_once(
        model, "train", lambda mode=True: model if mode else model.train(mode)
    ):
        yield
        return
    try:
        yield
    finally:
        _remove_shadow(model, "train")


def fast_zero_grad_once(model: nn.Module, parameters: list[nn.Parameter]) -> None:
    """Make the next ``model.zero_grad()`` set the gradients of ``parameters`` (all of the model's) to None.

    ``Trainer`` calls ``model.zero_grad()`` after every optimizer step, which walks every module
    for its parameters (0.3 to 0.5 ms for a ResNet-56 on a CPU) to do what this does over a kept
    list. ``zero_grad(set_to_none=False)`` goes to the model's own method.
    """

    def zero_grad(set_to_none: bool = True) -> None:
        if not set_to_none:
            return model.zero_grad(set_to_none=False)
        for parameter in parameters:
            parameter.grad = None

    shadow_once(model, "zero_grad", zero_grad)


def remove_pending_shadows(model: nn.Module) -> None:
    """Drop the one-shot ``train`` / ``zero_grad`` replacements still set on ``model`` (a run that ended early)."""
    for name in ("train", "zero_grad"):
        _remove_shadow(model, name)

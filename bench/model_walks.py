"""Host time of the per-step walks over a model: the Trainer's against stim_hf's (stim_hf/training/model_walks.py).

  python bench/model_walks.py                 # CIFAR ResNet-56 (208 modules, 57 BatchNorm layers)
  python bench/model_walks.py --depth 110

A training step calls ``model.train()`` (Trainer.training_step), ``model.zero_grad()`` (the
Trainer's loop, after the optimizer step) and freezes the BatchNorm statistics around each
sub-network pass. Each line times the Trainer's (or the earlier stim_hf) way and the current one,
alternated in the same process, in microseconds per call (best of --repeats). On a GPU, where a
CIFAR ResNet's step is bound by the host, these microseconds are step time.
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Callable

import torch

from stim_hf.method.batchnorm import batchnorm_layers, frozen_running_stats
from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification
from stim_hf.training.model_walks import all_modules_training, fast_zero_grad_once, redundant_train_call_skipped


def best_us(function: Callable[[], object], number: int, repeats: int) -> float:
    """Best per-call time in microseconds over ``repeats`` runs of ``number`` calls."""
    return min(timeit.repeat(function, number=number, repeat=repeats)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--number", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    a = parser.parse_args()
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=a.depth, num_labels=10)).train()
    model(pixel_values=torch.randn(2, 3, 32, 32)).logits.sum().backward()
    parameters, layers = list(model.parameters()), batchnorm_layers(model)

    def skipped_train() -> None:
        with redundant_train_call_skipped(model):
            model.train()

    def kept_list_zero_grad() -> None:
        fast_zero_grad_once(model, parameters)
        model.zero_grad()

    def walk_and_freeze() -> None:  # what frozen_running_stats did before: list the layers, nn.Module.__setattr__
        walked = batchnorm_layers(model)
        for layer in walked:
            layer.track_running_stats = False
        for layer in walked:
            layer.track_running_stats = True

    def kept_list_freeze() -> None:
        with frozen_running_stats(layers):
            pass

    cases = [
        ("model.train() on a training model", model.train, skipped_train),
        ("model.zero_grad()", model.zero_grad, kept_list_zero_grad),
        ("freeze BatchNorm statistics (per sub-network pass)", walk_and_freeze, kept_list_freeze),
    ]
    modules = sum(1 for _ in model.modules())
    print(f"CIFAR ResNet-{a.depth}: {modules} modules, {len(parameters)} parameters, {len(layers)} BatchNorm layers")
    print(f"{'walk':52s} {'before, us':>11s} {'now, us':>9s} {'ratio':>7s}")
    results = {}
    for name, before, now in cases:
        times = {"before": [], "now": []}
        for _ in range(a.repeats):  # alternate, so machine noise hits both alike
            times["before"].append(best_us(before, a.number, 1))
            times["now"].append(best_us(now, a.number, 1))
        old, new = min(times["before"]), min(times["now"])
        results[name] = {"before_us": old, "now_us": new}
        print(f"{name:52s} {old:11.1f} {new:9.1f} {old / new:7.1f}")
    check = best_us(lambda: all_modules_training(model), a.number, a.repeats)
    print(f"(of which the read-only train-mode check: {check:.1f} us)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"depth": a.depth, "modules": modules, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

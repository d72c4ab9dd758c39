"""Time of one optimizer step: the Trainer's optimizer as it builds it against ``fused_optimizer`` (torch's fused kernel).

  python bench/optimizer_step.py                  # CIFAR ResNet-56, the CIFAR recipes' SGD and AdamW
  python bench/optimizer_step.py --depth 110

Both optimizers come from ``StimulativeTrainer.create_optimizer`` with the CIFAR recipes' settings
(``optim: sgd``, momentum 0.9, Nesterov, weight decay 5e-4 in the Trainer's two groups; and
``adamw_torch``), ``fused_optimizer`` false then true, over the same model with gradients set. Each
line times ``optimizer.step()`` alternated in one process, microseconds per step, best of
``--repeats``; on a GPU the clock is read after a synchronise, so it is the device's time when
the device is the slower. It also checks that both updates agree.
"""

from __future__ import annotations

import argparse
import copy
import json
import timeit

import torch

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments
from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
OPTIMIZERS = {"sgd": "momentum=0.9,nesterov=true", "adamw_torch": None}


def build_optimizer(model: torch.nn.Module, optim: str, fused: bool) -> torch.optim.Optimizer:
    """The optimizer StimulativeTrainer builds for ``model`` (torch's, unwrapped from accelerate's)."""
    args = StimulativeTrainingArguments(
        output_dir="/tmp/bench_optimizer_step", optim=optim, optim_args=OPTIMIZERS[optim], learning_rate=0.1,
        weight_decay=5e-4, fused_optimizer=fused, use_cpu=not CUDA, report_to="none", save_strategy="no",
    )  # fmt: skip
    trainer = StimulativeTrainer(model=model, args=args)
    return trainer.create_optimizer()


def best_us(step, number: int, repeats: int) -> float:
    """Best per-step time in microseconds over ``repeats`` runs of ``number`` steps."""

    def run() -> None:
        for _ in range(number):
            step()
        if CUDA:
            torch.cuda.synchronize()

    run()  # lazily created state (momentum buffers, Adam moments)
    return min(timeit.repeat(run, number=1, repeat=repeats)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--number", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    a = parser.parse_args()
    torch.manual_seed(0)
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=a.depth, num_labels=10)).to(DEVICE)
    tensors = sum(1 for _ in model.parameters())
    device = torch.cuda.get_device_name() if CUDA else "CPU"
    print(f"CIFAR ResNet-{a.depth} ({tensors} parameter tensors), {device}, us per optimizer.step()")
    results = {}
    for optim in OPTIMIZERS:
        models = {fused: copy.deepcopy(model) for fused in (False, True)}
        for m in models.values():  # the same gradients for both (deepcopy does not copy them)
            torch.manual_seed(1)
            m(pixel_values=torch.randn(2, 3, 32, 32, device=DEVICE)).logits.sum().backward()
        optimizers = {fused: build_optimizer(m, optim, fused) for fused, m in models.items()}
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(2):  # alternate, so machine noise hits both alike
            for fused, optimizer in optimizers.items():
                times[fused].append(best_us(optimizer.step, a.number, a.repeats))
        weights = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in models.values()]
        difference = (weights[0] - weights[1]).abs().max().item()
        built = optimizers[False].defaults.get("foreach"), optimizers[True].defaults.get("fused")
        ratio = min(times[False]) / min(times[True])
        print(
            f"{optim:12s} as the Trainer builds it (foreach={built[0]}): "
            f"{', '.join(f'{t:.0f}' for t in times[False])}; fused={built[1]}: "
            f"{', '.join(f'{t:.0f}' for t in times[True])}; ratio {ratio:.1f}x; "
            f"largest weight difference after {2 * (a.repeats + 1) * a.number} steps: {difference:.3g}"
        )
        results[optim] = {
            "trainer_us": times[False],
            "fused_us": times[True],
            "ratio": ratio,
            "max_abs_diff": difference,
        }
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "args": vars(a), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

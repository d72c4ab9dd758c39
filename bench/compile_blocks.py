"""Does ``torch.compile`` per residual block pay? Eager against compiled blocks, common training, one process.

  python bench/compile_blocks.py                         # CIFAR ResNet-56, batch 128, CPU
  python bench/compile_blocks.py --batch 128 --steps 30  # on a GPU (bf16 autocast)
  python bench/compile_blocks.py --modes default,reduce-overhead   # GPU: also each block as CUDA graphs

Whole-model compilation recompiles for every new sub-network (DESIGN.md section 3); compiling each
block instead leaves the stage containers eager, so sub-network passes keep working. This times
plain common-training steps (channels_last, SGD) of the same model built twice, one with every
block compiled (``nn.Module.compile``, one model per ``--modes`` entry; ``reduce-overhead`` replays
each block as a CUDA graph on a GPU, which is what a launch-bound CIFAR ResNet would need),
alternated twice; it prints ms per step and the one-off compile + warm-up time of each. Not in the trainer: on this project's CPU it is slower (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def build(depth: int, mode: str | None) -> torch.nn.Module:
    """The CIFAR ResNet (seed 0, channels_last, training mode), its blocks compiled in ``mode`` unless None."""
    torch.manual_seed(0)
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=depth, num_labels=10))
    model = model.to(DEVICE, memory_format=torch.channels_last).train()
    if mode is not None:
        for stage in model.resnet.stages:
            for block in stage.layers:
                block.compile(mode=mode)
    return model


def time_steps(model: torch.nn.Module, batch: int, steps: int, warmup: int, size: int = 32) -> tuple[float, float]:
    """(seconds per step after warm-up, seconds of warm-up) for plain CE steps on random data."""
    x = torch.randn(batch, 3, size, size, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(model(pixel_values=x).logits.float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    if CUDA:
        torch.cuda.synchronize()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if CUDA:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32, help="input side in px (small: a launch-bound stand-in)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--modes", default="default", help="torch.compile modes, comma-separated")
    parser.add_argument("--json", default=None)
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    # Every block shares BasicBlock.forward: each stage's shapes, the downsampling blocks and every mode
    # compile it again, past dynamo's default limit of 8 (beyond which the blocks would silently run eager).
    torch._dynamo.config.recompile_limit = 64
    models = {"eager": build(a.depth, None)}
    models.update({f"compiled blocks, {mode}": build(a.depth, mode) for mode in a.modes.split(",")})
    runs: dict[str, list[float]] = {name: [] for name in models}
    compile_s: dict[str, float] = {}
    for _ in range(2):  # alternate, so machine noise hits all alike
        for name, model in models.items():
            per_step, warm = time_steps(model, a.batch, a.steps, a.warmup, a.image_size)
            runs[name].append(per_step)
            compile_s.setdefault(name, warm)
    device = torch.cuda.get_device_name() if CUDA else "CPU"
    print(f"CIFAR ResNet-{a.depth}, batch {a.batch}, {a.image_size} px, common training, {device}")
    for name, times in runs.items():
        ratio = min(times) / min(runs["eager"])
        print(
            f"{name:34s}: {', '.join(f'{t * 1e3:.1f}' for t in times)} ms per step; / eager (best of each) "
            f"{ratio:.2f}; first compile + warm-up {compile_s[name]:.0f} s"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"device": device, "args": vars(a), "seconds_per_step": runs, "compile_s": compile_s}, f, indent=2
            )


if __name__ == "__main__":
    main()

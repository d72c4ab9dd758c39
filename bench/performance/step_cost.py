"""Step cost of CT, ST (K=1), ST++ (K=1) and ST++ (K=6) against their FLOP floor, side by side.

  python bench/performance/step_cost.py --model resnet50                 # GPU check: HF ResNet-50, 224 px, bf16, channels_last
  python bench/performance/step_cost.py --model cifar_resnet56 --batch 128 --image-size 32   # CPU
  python bench/performance/step_cost.py --model resnet50 --tiny          # smoke test of the script on a CPU
  python bench/performance/step_cost.py --model resnet50 --batch 16 --steps 3 --warmup 1 --twice   # ResNet-50 on a CPU

ST++ draws a new input size for each sub-network (14..32 px at 32, 96..224 at 224): the first step at
a size pays a one-off kernel creation, far above the step itself. Warm up until every size was
seen, or pass --twice (the same draws again, all warm).

Each configuration trains ``--steps`` optimizer steps on one synthetic batch that lives on the
device (no data loading), through ``StimulativeTrainer.training_step`` plus the optimizer step, so
what is timed is the Trainer's arithmetic. For every configuration it prints images/s, the peak
memory (CUDA peak allocation, or CPU peak RSS growth when run with --isolate), and the ratio of
its step time to CT's next to the ratio of its FLOPs to CT's: ``1 + sum_k F(subnet_k) / F(full)``
with the FLOPs of the sub-networks actually drawn (counted with torch's FlopCounterMode at their
input sizes). Writes JSON with --json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments
from stim_hf.analysis.flops import count_flops
from stim_hf.method import find_residual_stages

CONFIGS = {
    "CT": dict(stim_method="ct"),
    "ST K=1": dict(stim_method="st", num_subnets=1),
    "ST++ K=1": dict(stim_method="stpp", num_subnets=1),
    "ST++ K=1 sequential": dict(stim_method="stpp", num_subnets=1, backward_strategy="sequential"),
    "ST++ K=6": dict(stim_method="stpp", num_subnets=6),
    "ST++ K=6 sequential": dict(stim_method="stpp", num_subnets=6, backward_strategy="sequential"),
    # the Trainer's optimizer as it builds it, without torch's fused kernel (fused_optimizer)
    "CT unfused": dict(stim_method="ct", fused_optimizer=False),
    "ST++ K=1 unfused": dict(stim_method="stpp", num_subnets=1, fused_optimizer=False),
}
DEFAULT_CONFIGS = ("CT", "ST K=1", "ST++ K=1", "ST++ K=1 sequential", "ST++ K=6", "ST++ K=6 sequential")


def build_model(name: str, tiny: bool):
    """A randomly initialised model from its config (no download)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification

    if name == "resnet50":
        sizes = [16, 32, 64, 128] if tiny else [256, 512, 1024, 2048]
        config = ResNetConfig(
            embedding_size=16 if tiny else 64, hidden_sizes=sizes, depths=[3, 4, 6, 3], layer_type="bottleneck",
            num_labels=1000,
        )  # fmt: skip
        return ResNetForImageClassification(config)
    depth = int(name.removeprefix("cifar_resnet"))
    return CifarResNetForImageClassification(CifarResNetConfig(depth=depth, num_labels=10))


def measure(name: str, overrides: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Time ``args.steps`` training steps of one configuration; its peak memory above what was allocated before."""
    gc.collect()  # the previous configuration's trainer holds reference cycles: free its memory first
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() if cuda else 0
    torch.manual_seed(0)
    model = build_model(args.model, args.tiny).to(device)
    num_labels = model.config.num_labels
    training_args = StimulativeTrainingArguments(
        output_dir="/tmp/bench_step_cost", per_device_train_batch_size=args.batch, learning_rate=0.1, optim="sgd",
        optim_args="momentum=0.9,nesterov=true", weight_decay=5e-4,  # the recipes' SGD
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=not cuda, bf16=cuda and not args.fp32,
        channels_last=cuda if getattr(args, "channels_last", None) is None else args.channels_last, max_steps=args.steps, num_eval_subnets=0, seed=0, **overrides,
    )  # fmt: skip
    trainer = StimulativeTrainer(model=model, args=training_args)
    trainer.create_optimizer_and_scheduler(num_training_steps=args.steps)
    trainer.state.num_train_epochs, trainer.state.epoch = 1, 0.0
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() otherwise
    model = trainer.accelerator.prepare_model(trainer.model)
    batch = {
        "pixel_values": torch.randn(args.batch, 3, args.image_size, args.image_size, device=device),
        "labels": torch.randint(0, num_labels, (args.batch,), device=device),
    }
    times = []
    for step in range(args.warmup + args.steps):
        trainer.state.global_step = step
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.training_step(model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_time = sorted(times)[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20 if cuda else float("nan")

    # FLOPs: full network once, every sub-network drawn during the timed steps at its input size.
    example = batch["pixel_values"][:1].float()
    unwrapped = trainer.accelerator.unwrap_model(model).float()
    full = count_flops(unwrapped, example)
    stages = find_residual_stages(unwrapped)
    cache: dict = {}
    sub_total = 0
    if trainer.args.uses_subnets:
        for step in range(args.warmup, args.warmup + args.steps):
            for k in range(trainer.args.num_subnets):
                subnet = trainer.subnet_sampler.sample(step, 0, k, image_size=args.image_size)
                if subnet not in cache:
                    cache[subnet] = count_flops(unwrapped, example, stages, subnet)
                sub_total += cache[subnet]
    flop_ratio = 1 + sub_total / (full * args.steps)
    return {
        "config": name, "step_s": step_time, "images_per_s": args.batch / step_time, "peak_mb": peak,
        "full_gflops_per_image": full / 1e9, "flop_ratio_to_ct": flop_ratio,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="resnet50 or cifar_resnet{20,56,110}")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"of {', '.join(CONFIGS)}")
    parser.add_argument(
        "--cudnn-benchmark", action="store_true",
        help="torch.backends.cudnn.benchmark = True: cuDNN times its kernels for each new shape and keeps the fastest",
    )  # fmt: skip
    parser.add_argument(
        "--twice",
        action="store_true",
        help="measure each configuration twice in a row and keep the second: its input sizes were all seen, so "
        "one-off kernel creation (oneDNN on a CPU, cuDNN plans on a GPU) is out of the timing",
    )
    parser.add_argument("--tiny", action="store_true", help="narrow model, small batch: a smoke test")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on the GPU")
    parser.add_argument(
        "--channels-last", default=None, type=lambda v: v.lower() in ("1", "true", "yes"),
        help="true / false: channels_last memory format (default: on a GPU only)",
    )  # fmt: skip
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.image_size, args.steps, args.warmup = 4, 64, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    rows = []
    for config in args.configs.split(","):
        row = measure(config, CONFIGS[config], args, device)
        if args.twice:  # same seed, same sub-networks and sizes: kernels and plans now exist for all of them
            cold = row["step_s"]
            row = measure(config, CONFIGS[config], args, device)
            row["first_pass_step_s"] = cold
        rows.append(row)
    ct = next((r for r in rows if r["config"] == "CT"), rows[0])
    print(f"\n{args.model}, batch {args.batch}, {args.image_size} px, {name}")
    print(f"{'config':<22}{'images/s':>10}{'step ms':>10}{'peak MB':>10}{'time/CT':>9}{'FLOPs/CT':>10}")
    for r in rows:
        r["time_ratio_to_ct"] = r["step_s"] / ct["step_s"]
        print(
            f"{r['config']:<22}{r['images_per_s']:>10.1f}{1000 * r['step_s']:>10.1f}{r['peak_mb']:>10.0f}"
            f"{r['time_ratio_to_ct']:>9.2f}{r['flop_ratio_to_ct']:>10.2f}"
        )
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

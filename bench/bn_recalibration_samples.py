"""How many training images re-estimating a sub-network's BatchNorm statistics needs (issue 16).

  # the digits: the quickstart's output (stim-hf train configs/quickstart.yaml)
  python bench/bn_recalibration_samples.py outputs/quickstart --config configs/quickstart.yaml
  # CIFAR-10: a short ResNet-20 ST++ run (python scripts/train.py configs/cifar10_resnet56_stpp.yaml
  #   --model_config '{"depth": 20}' --max_train_samples 5000 --max_eval_samples 2000 --num_train_epochs 3
  #   --dataloader_num_workers 0 --kl_coef 1 --kl_coef_schedule constant --kl_loss kl_direction
  #   --output_dir /tmp/c20)
  python bench/bn_recalibration_samples.py /tmp/c20 --config configs/cifar10_resnet56_stpp.yaml \\
      --max_eval_samples 2000

For one checkpoint, the fixed sub-networks its recipe evaluates (``num_eval_subnets``, ``seed`` and
the sampling rule, as ``stim-hf loafing --config`` takes them) are scored on the validation split
with the full network's BatchNorm statistics (inherited) and with statistics re-estimated for each
(:func:`stim_hf.method.batchnorm.subnet_batchnorm_statistics`, exact pooling) on N training images, for
every N of ``--sizes``, each with ``--repeats`` different draws of the images (seeds ``seed``,
``seed + 1``, ...). Prints a Markdown table: per N the mean sub-network top-1 of each draw, their
mean and spread, the largest spread of one sub-network's top-1 over the draws, and the time of one
re-estimation; ``--out FILE.json`` keeps every number.
Any other ``stim-hf loafing`` argument (data fields, ``--batch-size``, ``--device``) is passed on.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: busy-waiting threads on a shared CPU
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

SIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def main(argv: list[str] | None = None) -> dict:
    """Measure, print the table, write ``--out``; return the measurements."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="numbers of images N, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="draws of the N images per size")
    parser.add_argument("--out", default=None, help="write every number as JSON here")
    own, rest = parser.parse_known_args(argv)
    sizes = [int(n) for n in own.sizes.split(",")]

    import torch

    from stim_hf.analysis.evaluation import BatchSource, evaluate_model, recalibration_batches
    from stim_hf.data.image_datasets import load_image_datasets
    from stim_hf.data.transforms import with_image_transforms
    from stim_hf.method import find_residual_stages
    from stim_hf.method.batchnorm import subnet_batchnorm_statistics
    from stim_hf.tools.loafing import _resolve_device, fixed_eval_subnets, load_checkpoint, parse_loafing_args

    args, data_args, checkpoints = parse_loafing_args(rest)
    device = _resolve_device(args.device)
    splits = load_image_datasets(data_args, seed=args.seed)
    eval_batches = BatchSource(with_image_transforms(splits["validation"], data_args, train=False), args.batch_size)
    model = load_checkpoint(checkpoints[0], device)
    stages = find_residual_stages(model)
    subnets = fixed_eval_subnets(stages, args.num_subnets, args.seed, args.sampling, args.sample_space_value)

    def accuracies(batches=None, num=0) -> tuple[list[float], float]:
        """Each sub-network's top-1 (re-estimated on ``batches`` when given) and seconds per re-estimation."""
        scores, seconds = [], 0.0
        for subnet in subnets:
            if batches is None:
                scores.append(evaluate_model(model, eval_batches, stages, subnet, device=device)["accuracy"])
                continue
            started = time.perf_counter()
            with subnet_batchnorm_statistics(model, batches, num, stages, subnet, device):
                seconds += time.perf_counter() - started
                scores.append(evaluate_model(model, eval_batches, stages, subnet, device=device)["accuracy"])
        return scores, seconds / len(subnets)

    started = time.perf_counter()
    full = evaluate_model(model, eval_batches, device=device)["accuracy"]
    inherited = statistics.mean(accuracies()[0])
    rows = []
    for num in sizes:
        used = min(num, len(splits["train"]))
        draws, per_subnet, seconds = [], [], []
        for repeat in range(own.repeats):
            batches = recalibration_batches(splits["train"], data_args, num, args.seed + repeat, args.batch_size)
            scores, cost = accuracies(batches, num)
            draws.append(statistics.mean(scores))
            per_subnet.append(scores)
            seconds.append(cost)
            print(f"N={num} draw {repeat}: {100 * draws[-1]:.2f}% ({cost:.2f} s per re-estimation)", flush=True)
        rows.append(
            {
                "N": num,
                "images_used": used,
                "accuracies": draws,
                "subnet_accuracies": per_subnet,  # [draw][sub-network]
                "seconds_per_reestimation": seconds,
            }
        )

    result = {
        "command": "python bench/bn_recalibration_samples.py " + shlex.join(argv),
        "checkpoint": checkpoints[0],
        "num_train_images": len(splits["train"]),
        "num_eval_images": len(splits["validation"]),
        "subnets": [[list(k) for k in s.kept] for s in subnets],
        "full_accuracy": full,
        "inherited_accuracy": inherited,
        "rows": rows,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - started,
    }
    print(format_table(result))
    if own.out:
        Path(own.out).parent.mkdir(parents=True, exist_ok=True)
        Path(own.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: dict) -> str:
    """The Markdown table of :func:`main`'s measurements (accuracies in %)."""
    repeats = len(result["rows"][0]["accuracies"])
    header = ["N", *(f"draw {i + 1}" for i in range(repeats)), "mean", "max - min"]
    header += ["largest max - min of one sub-network", "s per re-estimation"]
    lines = [
        f"{result['checkpoint']}: full network {100 * result['full_accuracy']:.2f}%, mean of "
        f"{len(result['subnets'])} sub-networks with inherited statistics {100 * result['inherited_accuracy']:.2f}% "
        f"({result['num_eval_images']} validation images, {result['num_train_images']} training images)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for row in result["rows"]:
        draws = row["accuracies"]
        n = str(row["N"]) if row["images_used"] == row["N"] else f"{row['N']} (all {row['images_used']})"
        cells = [n, *(f"{100 * a:.2f}" for a in draws), f"{100 * statistics.mean(draws):.2f}"]
        one = max(max(scores) - min(scores) for scores in zip(*row["subnet_accuracies"], strict=True))
        cells += [f"{100 * (max(draws) - min(draws)):.2f}", f"{100 * one:.2f}"]
        cells.append(f"{statistics.mean(row['seconds_per_reestimation']):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Training worker for the multi-process tests: run under ``accelerate launch`` or plain python.

Trains a tiny residual network with StimulativeTrainer on a fixed synthetic dataset, then every
rank writes its parameters (``rank{R}.safetensors``) and the sub-networks it drew
(``rank{R}_subnets.json``) into ``--out``. With ``--evaluate_subnets N`` it then evaluates two
fixed sub-networks, BatchNorm statistics re-estimated on N training images, and records them.
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Array3D, Dataset, Features, Value  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers.modeling_outputs import ImageClassifierOutput  # noqa: E402

from stim_hf import ResidualStage, StimulativeTrainer, StimulativeTrainingArguments, register_stage_finder  # noqa: E402
from stim_hf.cli.train import end_distributed_run  # noqa: E402
from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification  # noqa: E402


class ResidualBlock(nn.Module):
    """conv-relu-conv with an identity shortcut and no normalisation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + 0.5 * self.conv2(torch.relu(self.conv1(x)))


class NoNormResNet(nn.Module):
    """Two residual stages without BatchNorm: the loss of a batch is the mean of its samples' losses,
    so two processes of 8 images give exactly the gradient of one process with 16."""

    def __init__(self, num_labels: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage1 = nn.Sequential(*[ResidualBlock(8) for _ in range(3)])
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.stage2 = nn.Sequential(*[ResidualBlock(16) for _ in range(3)])
        self.head = nn.Linear(16, num_labels)

    def forward(self, pixel_values, labels=None):
        x = self.stage1(torch.relu(self.stem(pixel_values)))
        x = self.stage2(torch.relu(self.down(x)))
        return ImageClassifierOutput(logits=self.head(x.mean(dim=(2, 3))))


class StemBatchNormResNet(NoNormResNet):
    """One BatchNorm, after the stem: its input depends on no other BatchNorm, so statistics pooled
    over any split of the images into batches and processes are exactly those of all the images."""

    def __init__(self, num_labels: int = 10) -> None:
        super().__init__(num_labels)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, pixel_values, labels=None):
        x = self.stage1(torch.relu(self.bn(self.stem(pixel_values))))
        x = self.stage2(torch.relu(self.down(x)))
        return ImageClassifierOutput(logits=self.head(x.mean(dim=(2, 3))))


def find_nonorm_stages(model):
    if not isinstance(model, NoNormResNet):
        return None
    return [ResidualStage("stage1", model.stage1, (True,) * 3), ResidualStage("stage2", model.stage2, (True,) * 3)]


register_stage_finder("test_nonorm_resnet", find_nonorm_stages, overwrite=True)


def dataset(n: int = 64, size: int = 16) -> Dataset:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    images = rng.normal(size=(n, 3, size, size)).astype(np.float32)
    images[:, 0] += labels[:, None, None] * 0.3
    # Array3D: torch formatting reads the images as arrays (a nested-list column is ~25x slower).
    features = Features({"pixel_values": Array3D(shape=images.shape[1:], dtype="float32"), "labels": Value("int64")})
    return Dataset.from_dict({"pixel_values": images, "labels": labels}, features=features).with_format("torch")


def channels_last_batches(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack examples into a batch whose images are in channels-last memory order."""
    pixels = torch.stack([e["pixel_values"] for e in examples]).contiguous(memory_format=torch.channels_last)
    return {"pixel_values": pixels, "labels": torch.stack([e["labels"] for e in examples])}


def live_threads() -> int | None:
    """The process's threads, C++ ones included (Linux); None where /proc does not list them."""
    tasks = Path("/proc/self/task")
    return len(list(tasks.iterdir())) if tasks.is_dir() else None


def main() -> None:
    """Train and record (the trainer is out of reach afterwards, as in the training job), then end the run as the
    training job ends it and record the threads before and after (gloo's are joined then)."""
    out, rank = train_and_record()
    threads_before = live_threads()
    end_distributed_run()
    teardown = {"threads_before_end": threads_before, "threads_after_end": live_threads()}
    (out / f"rank{rank}_teardown.json").write_text(json.dumps(teardown))


def train_and_record() -> tuple[Path, int]:
    """Parse the arguments, train, and write this rank's parameters and record; returns the folder and the rank."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", choices=["nonorm", "stem_bn", "cifar"], default="nonorm")
    parser.add_argument("--per_device_batch", type=int, default=8)
    parser.add_argument("--ga", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--num_subnets", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--sync_batchnorm", action="store_true")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument(
        "--channels_last_images", action="store_true", help="batches in channels-last order, as the predecoded pipeline"
    )
    parser.add_argument("--backward_strategy", default="summed")
    parser.add_argument("--on_nonfinite_loss", default="stop")
    parser.add_argument("--poison_step", type=int, default=0, help="the last rank's CE is inf at this step")
    parser.add_argument("--no_train", action="store_true")
    parser.add_argument("--evaluate_subnets", type=int, default=-1, help="re-estimation images (-1: do not evaluate)")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.model == "nonorm":
        model = NoNormResNet()
    elif args.model == "stem_bn":
        model = StemBatchNormResNet()
    else:
        model = CifarResNetForImageClassification(CifarResNetConfig(depth=14, widths=[8, 16, 32], num_labels=10))
    training_args = StimulativeTrainingArguments(
        output_dir=args.out,
        stim_method="stpp",
        num_subnets=args.num_subnets,
        min_input_scale=0.5,
        per_device_train_batch_size=args.per_device_batch,
        gradient_accumulation_steps=args.ga,
        max_steps=args.steps,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=7,
        use_cpu=True,
        bf16=args.bf16,
        sync_batchnorm=args.sync_batchnorm,
        channels_last=args.channels_last,
        backward_strategy=args.backward_strategy,
        on_nonfinite_loss=args.on_nonfinite_loss,
        dataloader_num_workers=0,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
    )
    collator = channels_last_batches if args.channels_last_images else None
    trainer = StimulativeTrainer(model=model, args=training_args, train_dataset=dataset(), data_collator=collator)
    if args.poison_step:
        main_loss = trainer.main_loss

        def poisoned_main_loss(logits, labels):
            ce = main_loss(logits, labels)
            last_rank = training_args.process_index == training_args.world_size - 1
            hit = last_rank and trainer.model.training and trainer.state.global_step == args.poison_step - 1
            return ce * float("inf") if hit else ce

        trainer.main_loss = poisoned_main_loss
    if not args.no_train:
        trainer.train()
    subnet_results = None
    if args.evaluate_subnets >= 0:
        subnet_results = trainer.evaluate_subnets(
            eval_dataset=dataset(), num_subnets=2, bn_recalibration_samples=args.evaluate_subnets
        )
    rank = training_args.process_index
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().float().contiguous()
        for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
    }
    save_file(state, str(out / f"rank{rank}.safetensors"))
    logs = [e for e in trainer.state.log_history if "loss" in e]
    record = {
        "subnets": [list(s) for s in trainer.sampled_subnets],
        "logs": logs,
        "world_size": training_args.world_size,
        "skipped_steps": trainer.nonfinite_skipped_steps,
        "subnet_results": subnet_results,
    }
    (out / f"rank{rank}_subnets.json").write_text(json.dumps(record))
    return out, rank


if __name__ == "__main__":
    main()

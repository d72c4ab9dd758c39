"""Draw how one batch flows through a stimulative training step: ``docs/figures/training_step.png``.

Run from the repository root: ``python docs/figures/training_step.py`` (``--output PATH`` to write
elsewhere). Each box names the step and the file that owns it; the boxes on the right are the parts
that exist only to keep the Hugging Face Trainer fast or crash-safe (docs/architecture.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch  # noqa: E402

OUTPUT = Path(__file__).resolve().with_name("training_step.png")

METHOD, PIPELINE, FAST, SAFE = "#dbe9f6", "#e8e8e8", "#fde2c4", "#d5efd5"

# (title, owner, colour) from top to bottom: the step's own work.
STEPS = [
    ("batch of images and labels", "stim_hf/data/ (image_datasets.py, transforms.py, predecoded.py)", PIPELINE),
    ("to the device, device transform", "Trainer._prepare_inputs -> data/device_augmentation.py", PIPELINE),
    ("full forward, cross-entropy", "training/trainer.py: compute_loss, main_loss", METHOD),
    ("draw K sub-networks (depths, input size)", "method/sampling.py, method/stages.py + families.py", METHOD),
    ("sub-network forwards (blocks shortened)", "method/running.py, method/batchnorm.py", METHOD),
    ("KL to the detached full network, x lambda(t)", "method/losses.py; training/trainer.py: current_kl_coef", METHOD),
    ("backward (summed, or sequential)", "training/trainer.py: training_step", METHOD),
    ("optimizer step, zero_grad", "Trainer + training/optimizers.py", METHOD),
]

# (step index it attaches to, title, owner, colour): what is there for speed or for safety only.
AROUND = [
    (0, "seeded batch order: exact resume", "training/checkpointing.py: SeededBatchDataset", SAFE),
    (0, "wait for batches timed: data_wait_fraction", "training/pace.py", FAST),
    (1, "copy without blocking (non_blocking)", "training/config.py", FAST),
    (2, "model.train() walk skipped when redundant", "training/model_walks.py", FAST),
    (4, "BatchNorm layers listed once per model", "training/model_walks.py", FAST),
    (5, "non-finite guard, counted after the forward", "training/reliable_trainer.py", SAFE),
    (6, "sequential: one sub-network's activations alive", "training/trainer.py", FAST),
    (7, "fused SGD / AdamW kernel", "training/optimizers.py", FAST),
    (7, "zero_grad over a kept parameter list", "training/model_walks.py", FAST),
    (7, "atomic checkpoint every save_steps", "training/checkpointing.py, reliable_trainer.py", SAFE),
]


def _box(ax: plt.Axes, x: float, y: float, width: float, title: str, owner: str, colour: str) -> None:
    ax.add_patch(
        FancyBboxPatch(
            (x, y - 0.32), width, 0.64, boxstyle="round,pad=0.02,rounding_size=0.08", facecolor=colour, edgecolor="#555"
        )
    )
    ax.text(x + 0.12, y + 0.1, title, fontsize=10.5, fontweight="bold", va="center")
    ax.text(x + 0.12, y - 0.16, owner, fontsize=8.5, family="monospace", va="center", color="#333")


def draw(output: Path = OUTPUT) -> Path:
    """Draw the figure into ``output`` (PNG) and return the path."""
    rows = len(STEPS)
    fig, ax = plt.subplots(figsize=(15, 0.95 * rows + 1.6))
    ax.set_xlim(0, 15.2)
    ax.set_ylim(-1.7, rows - 0.5)
    ax.axis("off")
    step_x, step_width = 0.1, 7.0
    ys = [rows - 1 - i for i in range(rows)]
    for (title, owner, colour), y in zip(STEPS, ys, strict=True):
        _box(ax, step_x, y, step_width, title, owner, colour)
    for upper, lower in zip(ys, ys[1:], strict=False):
        ax.add_patch(
            FancyArrowPatch(
                (step_x + 3.5, upper - 0.34), (step_x + 3.5, lower + 0.34), arrowstyle="-|>", mutation_scale=14
            )
        )
    side_x, side_width = 8.0, 7.1
    placed: dict[int, int] = {}
    for index, title, owner, colour in AROUND:
        slot = placed.get(index, 0)
        placed[index] = slot + 1
        y = ys[index] - 0.36 * slot
        ax.add_patch(
            FancyBboxPatch(
                (side_x, y - 0.15), side_width, 0.3, boxstyle="round,pad=0.01", facecolor=colour, edgecolor="#888"
            )
        )
        ax.text(side_x + 0.1, y, f"{title}  ({owner})", fontsize=8, va="center")
        ax.plot([step_x + step_width + 0.03, side_x - 0.03], [ys[index], y], color="#999", linewidth=0.8)
    fig.legend(
        handles=[
            Patch(facecolor=PIPELINE, edgecolor="#555", label="data pipeline"),
            Patch(facecolor=METHOD, edgecolor="#555", label="the method's step"),
            Patch(facecolor=FAST, edgecolor="#888", label="only for speed (or memory)"),
            Patch(facecolor=SAFE, edgecolor="#888", label="only for crash safety"),
        ],
        loc="lower center",
        ncol=4,
        bbox_to_anchor=(0.5, 0.0),
        frameon=False,
    )
    ax.set_title("One training step of StimulativeTrainer, and the file that owns each part", fontsize=13)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python docs/figures/training_step.py [--output PATH]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    print(draw(parser.parse_args(argv).output))


if __name__ == "__main__":
    main()

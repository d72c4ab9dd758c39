"""What the content hashes of a checkpoint cost: on write (the manifest) and on read (checked before use).

  python bench/performance/checkpoint_hashing.py                  # a ResNet-50 (25.6 M parameters, 102 MB of weights)
  python bench/performance/checkpoint_hashing.py --dir /scratch   # checkpoints written on another filesystem

The checkpoint is the one ``StimulativeTrainer`` writes for a ResNet-50 (transformers'
``ResNetForImageClassification``, 1000 classes) after one SGD step with momentum: weights,
momentum buffers, scheduler, random states (205 MB). Side by side in one process, alternated
``--repeats`` times:

- write: ``ReliableTrainer._save_checkpoint`` as shipped (sizes and xxh3-128 hashes in the
  manifest), the same save with sha256 hashes instead, and with sizes only (as before hashes);
- read: the check before a resume (``checkpoint_problems``) with xxh3-128, sha256 and sizes only,
  and loading the weights (``load_saved_classifier``) with and without the check;
- the hash functions at hand over the checkpoint's files, in memory: xxh3-128 (``xxhash``,
  installed with ``datasets``), sha256, blake2b and md5 (hashlib).

Medians in seconds; each hashing's share is over the save or read without it. Files just written
are read back from the page cache, as they are in a run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import ResNetConfig, ResNetForImageClassification

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments
from stim_hf.training import integrity, modeling, reliable_trainer
from stim_hf.training.checkpointing import checkpoint_problems
from stim_hf.training.modeling import load_saved_classifier


def build_trainer(output_dir: str) -> StimulativeTrainer:
    """A trainer over a ResNet-50 whose optimizer holds momentum buffers (one step taken)."""
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(num_labels=1000))
    args = StimulativeTrainingArguments(
        output_dir=output_dir, stim_method="ct", optim="sgd", optim_args="momentum=0.9", learning_rate=0.1,
        use_cpu=True, report_to="none", save_strategy="steps", save_steps=1, num_eval_subnets=0,
    )  # fmt: skip
    trainer = StimulativeTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    trainer.optimizer.step()
    return trainer


def no_hashes(path: str | os.PathLike, hash_name: str | None = None) -> str:
    """Stands in for :func:`integrity.file_digest`: a save or a check with sizes only."""
    return "0"


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def throughput(files: list[Path], name: str) -> float:
    """MB/s of one hash function over ``files`` (read into memory first)."""
    blobs = [path.read_bytes() for path in files]
    start = time.perf_counter()
    for blob in blobs:
        digest = integrity.HASHES[name]() if name in integrity.HASHES else hashlib.new(name)
        view = memoryview(blob)
        for offset in range(0, len(blob), 1 << 20):
            digest.update(view[offset : offset + (1 << 20)])
        digest.hexdigest()
    return sum(len(blob) for blob in blobs) / (time.perf_counter() - start) / 1e6


VARIANTS = ("xxh3_128", "sha256", "sizes only")


def measure_writes(trainer: StimulativeTrainer, root: str, repeats: int) -> tuple[dict, dict, dict[str, str]]:
    """Save times and, within them, the manifest's (the hashing), per variant; one checkpoint kept of each."""
    real_digest, real_manifest = integrity.file_digest, reliable_trainer.write_manifest
    saves: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    manifests: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    kept: dict[str, str] = {}
    for _ in range(repeats):
        for variant in VARIANTS:
            trainer.state.global_step += 1
            integrity.HASH_NAME = "xxh3_128" if variant == "sizes only" else variant
            integrity.file_digest = no_hashes if variant == "sizes only" else real_digest
            integrity._digests.clear()

            def timed_manifest(*args, variant=variant):
                start = time.perf_counter()
                result = real_manifest(*args)
                manifests[variant].append(time.perf_counter() - start)
                return result

            reliable_trainer.write_manifest = timed_manifest
            saves[variant].append(timed(lambda: trainer._save_checkpoint(trainer.model, None)))
            kept[variant] = str(Path(root, f"checkpoint-{trainer.state.global_step}"))
            for old in Path(root).glob("checkpoint-*"):
                if str(old) not in kept.values():
                    shutil.rmtree(old)  # one of each variant kept, as save_total_limit would
    integrity.HASH_NAME, integrity.file_digest = "xxh3_128", real_digest
    reliable_trainer.write_manifest = real_manifest
    return saves, manifests, kept


def measure_reads(kept: dict[str, str], repeats: int) -> dict[str, list[float]]:
    """The check before a resume per variant, the check of a model folder, and the load it guards."""
    reads: dict[str, list[float]] = {"xxh3_128": [], "sha256": [], "sizes only": [], "model check": [], "load": []}
    checkpoint = kept["xxh3_128"]
    for _ in range(repeats):
        for variant in ("xxh3_128", "sha256"):
            integrity._digests.clear()
            reads[variant].append(timed(lambda v=variant: checkpoint_problems(kept[v])))
        reads["sizes only"].append(timed(lambda: checkpoint_problems(checkpoint, hashes=False)))
        integrity._digests.clear()
        reads["model check"].append(timed(lambda: integrity.folder_problems(checkpoint)))
        modeling.folder_problems = lambda *args, **kwargs: []  # the load alone
        reads["load"].append(timed(lambda: load_saved_classifier(checkpoint)))
        modeling.folder_problems = integrity.folder_problems
    return reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="Where to write the checkpoints (default: a temporary folder).")
    parser.add_argument("--repeats", type=int, default=5)
    a = parser.parse_args()
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="checkpoint_hashing-", dir=a.dir)
    try:
        trainer = build_trainer(root)
        saves, manifests, kept = measure_writes(trainer, root, a.repeats)
        reads = measure_reads(kept, a.repeats)
        files = sorted(p for p in Path(kept["xxh3_128"]).iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in files)
        weights = Path(kept["xxh3_128"], "model.safetensors").stat().st_size
        median = statistics.median
        print(
            f"checkpoint: {size / 1e6:.1f} MB in {len(files)} files (model.safetensors {weights / 1e6:.1f} MB), "
            f"{a.repeats} repeats, medians, torch threads 1, in {root}"
        )
        for variant in VARIANTS:
            save, manifest = median(saves[variant]), median(manifests[variant])
            print(
                f"write  {variant:>10}: _save_checkpoint {save:.3f} s, of which the manifest {manifest:.3f} s = "
                f"{100 * manifest / (save - manifest):.1f} % of the rest of the save"
            )
        load = median(reads["load"])
        print(
            "read   checkpoint_problems (before a resume): "
            + ", ".join(f"{v} {median(reads[v]):.3f} s" for v in ("sizes only", "xxh3_128", "sha256"))
        )
        print(
            f"read   load_saved_classifier (export, search, loafing) {load:.3f} s; its check (xxh3_128: weights and "
            f"configs) {median(reads['model check']):.3f} s = {100 * median(reads['model check']) / load:.1f} % of it"
        )
        speeds = {name: throughput(files, name) for name in ("xxh3_128", "sha256", "blake2b", "md5")}
        print("hashes (MB/s, in memory): " + ", ".join(f"{name} {speed:.0f}" for name, speed in speeds.items()))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

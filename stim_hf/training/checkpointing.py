"""Crash-safe checkpoints, resuming from the last complete one, and exact augmentation replay.

What this module guarantees (see ``docs/reliability.md``):

- A checkpoint is written into a staging directory (``.staging-checkpoint-N/checkpoint-N``) and
  renamed to ``checkpoint-N`` only once every file is written, with a manifest of the files, their
  sizes and a hash of their bytes (:data:`MANIFEST_NAME`, :mod:`stim_hf.training.integrity`) written last.
  A process killed while writing leaves a staging directory, which nothing ever resumes from; no
  complete checkpoint is deleted before its successor is complete.
- :func:`find_last_complete_checkpoint` picks the newest ``checkpoint-N`` whose files are all
  there, as written (manifest sizes and hashes) and readable (safetensors headers, torch zip
  archives), so a checkpoint written by another tool, half-copied, truncated or damaged is skipped
  with a reason instead of failing mid-resume. Nothing here unpickles anything.
- :class:`SeededBatchDataset` runs a dataset's random transforms under a random state derived
  from ``(seed, batch indices)`` alone, so the augmentation of every batch is the same after a
  resume (and with any number of DataLoader workers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from stim_hf.errors import ConfigError
from stim_hf.training.integrity import CHECKPOINT_MANIFEST_NAME, MANIFEST_NAMES, content_problems, write_folder_manifest
from stim_hf.training.write_failures import describe_size

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"
MANIFEST_NAME = CHECKPOINT_MANIFEST_NAME
"""Written last into every checkpoint: the step and each file's size and hash, a completeness marker."""
TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_JSON_NAME = "training_args.json"
"""The training arguments as JSON; written instead of the Trainer's pickled ``training_args.bin``."""
STAGING_PREFIX = ".staging-checkpoint-"
REPLACED_PREFIX = ".replaced-checkpoint-"
MODEL_STAGING_NAME = ".staging-model"
"""Where the final model is written before its files replace those in ``output_dir``, one by one."""
RESUME_SENSITIVE_ARGUMENTS = (
    "optim",
    "optim_args",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "data_seed",
    "lr_scheduler_type",
    "stim_method",
    "num_subnets",
    "kl_loss",
    "subnet_sampling",
    "sample_space",
    "min_input_scale",
    "full_input_scale",
    "sandwich",
    "subnet_size_bias",
    "lr_floor",
    "bn_policy",
    "backward_strategy",
)
"""Arguments that a run must keep to continue exactly from a checkpoint (compared on resume)."""
NONFINITE_PREFIX = "nonfinite-step-"

_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
_TORCH_ARCHIVE_SUFFIXES = (".pt", ".pth", ".bin")
_FALSE_WORDS = ("false", "no", "none", "")
_TRUE_WORDS = ("true", "yes", "last")


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def staging_dir(run_dir: str, step: int) -> str:
    """The staging directory whose ``checkpoint-<step>`` child is written before being published."""
    return os.path.join(run_dir, f"{STAGING_PREFIX}{step}")


def remove_stale_staging(run_dir: str) -> list[str]:
    """Delete staging and replaced-checkpoint leftovers of earlier, interrupted saves in ``run_dir``.

    A ``.replaced-checkpoint-N`` whose ``checkpoint-N`` is absent and which is complete is the only
    copy of that checkpoint (a kill between the two renames of :func:`publish_checkpoint`, or before
    a rotation deleted it): it is renamed back instead.
    """
    removed = []
    if not os.path.isdir(run_dir):
        return removed
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name.startswith(REPLACED_PREFIX):
            original = os.path.join(run_dir, f"{CHECKPOINT_PREFIX}-{name[len(REPLACED_PREFIX) :]}")
            listed = os.path.isfile(os.path.join(path, MANIFEST_NAME))
            if not os.path.lexists(original) and listed and not checkpoint_problems(path):
                os.replace(path, original)
                logger.warning("restored %s, left aside by an interrupted save", original)
                continue
        if name.startswith((STAGING_PREFIX, REPLACED_PREFIX)) or name == MODEL_STAGING_NAME:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    if removed:
        logger.info("removed leftovers of interrupted checkpoint writes in %s: %s", run_dir, ", ".join(removed))
    return removed


def write_manifest(checkpoint_dir: str, step: int) -> dict[str, Any]:
    """Record every file of ``checkpoint_dir`` with its size and hash in :data:`MANIFEST_NAME` (last, fsynced)."""
    return write_folder_manifest(checkpoint_dir, MANIFEST_NAME, {"global_step": int(step)})


def publish_checkpoint(staged: str, final: str) -> None:
    """Atomically move the complete checkpoint ``staged`` to ``final``, replacing an older one there.

    The rename is atomic on POSIX filesystems: ``final`` is either absent, the old checkpoint or
    the complete new one. An existing ``final`` (a run resumed from an earlier step) is first
    renamed aside and deleted once the new one is in place.
    """
    _fsync_tree(staged)
    parent = os.path.dirname(os.path.abspath(final))
    replaced = _move_aside(final) if os.path.lexists(final) else None
    try:
        os.replace(staged, final)
    except OSError:
        if replaced is not None:  # the older checkpoint back in its place: nothing complete is lost
            os.replace(replaced, final)
        raise
    _fsync_path(parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    staging_root = os.path.dirname(os.path.abspath(staged))
    if os.path.basename(staging_root).startswith(STAGING_PREFIX):
        shutil.rmtree(staging_root, ignore_errors=True)


def rotate_checkpoints(
    run_dir: str,
    save_total_limit: int | None,
    keep: Iterable[str | None] = (),
    current_step: int | None = None,
) -> list[str]:
    """Delete ``checkpoint-N`` folders of ``run_dir`` beyond ``save_total_limit``, the least useful first.

    The folders in ``keep`` (the one just written, the best one) are never deleted. The others go
    in this order: first those of steps after ``current_step`` (left by a run that was resumed
    from an earlier step: another history, which ``resume_from_checkpoint=true`` would otherwise
    pick), then incomplete ones, then the oldest by modification time and step. The Trainer's own
    rotation orders by step alone and would keep exactly those leftovers. Each folder is renamed
    aside before it is deleted, so a process killed mid-deletion never leaves a partial
    ``checkpoint-N``.
    """
    if save_total_limit is None or save_total_limit <= 0:
        return []
    checkpoints = list_checkpoints(run_dir)
    excess = len(checkpoints) - save_total_limit
    if excess <= 0:
        return []
    protected = {os.path.abspath(path) for path in keep if path}
    candidates = [path for path in checkpoints if os.path.abspath(path) not in protected]

    def usefulness(path: str) -> tuple[bool, bool, float, int]:
        step = checkpoint_step(path) or 0
        from_abandoned_run = current_step is not None and step > current_step
        # Sizes only: a save never hashes the checkpoints it keeps again.
        return (not from_abandoned_run, not checkpoint_problems(path, hashes=False), os.path.getmtime(path), step)

    candidates.sort(key=usefulness)
    removed = []
    for path in candidates[:excess]:
        logger.info("deleting checkpoint %s (save_total_limit=%d)", path, save_total_limit)
        try:
            aside = _move_aside(path)
        except OSError as error:  # the new checkpoint is published: a folder that cannot go stays, with a warning
            logger.warning("could not delete checkpoint %s (save_total_limit): %s", path, error.strerror or error)
            continue
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(path)
    return removed


def _move_aside(checkpoint: str) -> str:
    """Rename ``checkpoint-N`` to ``.replaced-checkpoint-N`` (one atomic rename) and return the new path.

    A folder renamed aside is never resumed from, and :func:`remove_stale_staging` deletes it if
    the process dies before it does.
    """
    aside = os.path.join(
        os.path.dirname(os.path.abspath(checkpoint)), REPLACED_PREFIX + os.path.basename(checkpoint).split("-")[-1]
    )
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(checkpoint, aside)
    return aside


def publish_files(staged: str, final: str) -> None:
    """Move every file of the complete folder ``staged`` into ``final``, each with one atomic rename.

    Each file of ``final`` is at any moment either the old one or the complete new one; the
    weights go last. ``staged`` is removed afterwards.
    """
    _fsync_tree(staged)
    _move_files(staged, final)
    _fsync_path(final)
    shutil.rmtree(staged, ignore_errors=True)


def merge_local_files(staged: str, final: str) -> None:
    """Move this process's files from ``staged`` into ``final`` (nodes that do not share a filesystem)."""
    _move_files(staged, final)
    shutil.rmtree(os.path.dirname(os.path.abspath(staged)), ignore_errors=True)


def _move_files(source: str, target_dir: str) -> None:
    """``os.replace`` each file under ``source`` to its path under ``target_dir``, the weights and the manifest last."""
    files = sorted(
        (path for path in Path(source).rglob("*") if path.is_file()),
        key=lambda p: (p.name in MANIFEST_NAMES, p.suffix == ".safetensors", p),
    )
    for path in files:
        target = Path(target_dir) / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def _fsync_tree(root: str) -> None:
    for path in Path(root).rglob("*"):
        if path.is_file():
            _fsync_path(path)
    _fsync_path(root)


def _fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory; a no-op where the OS does not allow it (directories on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported (e.g. a directory on Windows): the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def checkpoint_step(path: str) -> int | None:
    """The step N of a ``checkpoint-N`` directory name, or None for any other name."""
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def checkpoint_problems(path: str, hashes: bool = True) -> list[str]:
    """Why ``path`` cannot be resumed from; an empty list when it is complete and as written.

    With a manifest (checkpoints written by stim_hf), the manifest must be of this folder's step
    and list the trainer state and the weights, and every listed file must exist with its recorded
    size and, with ``hashes`` and a manifest that records them, its recorded hash (a checkpoint
    written before content hashes is checked for sizes, with a one-time note). Without one (other
    tools), the checkpoint needs a readable ``trainer_state.json``, model weights in safetensors,
    and the optimizer, scheduler and random states that an exact continuation needs; every
    ``*.safetensors`` file must have a complete header and every torch archive (``*.pt``,
    ``*.pth``, ``*.bin``) must be a complete zip file. Only headers and zip directories are read
    then: nothing is unpickled.
    """
    if not os.path.isdir(path):
        return [f"'{path}' is not a directory"]
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if os.path.isfile(manifest_path):
        return _manifest_problems(path, manifest_path, hashes)
    return _unlisted_checkpoint_problems(path)


def _manifest_problems(path: str, manifest_path: str, hashes: bool) -> list[str]:
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        files, step = manifest["files"], manifest["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"its {MANIFEST_NAME} is unreadable ({type(error).__name__}: {error})"]
    if not isinstance(files, dict) or not all(isinstance(n, str) and type(v) is int for n, v in files.items()):
        return [f"its {MANIFEST_NAME} does not list the checkpoint's files with their sizes"]
    problems = []
    folder_step = checkpoint_step(path)
    if folder_step is not None and step != folder_step:
        problems.append(f"its {MANIFEST_NAME} is of step {step}, not {folder_step}")
    listed = {name.split("/", 1)[0] for name in files}
    if TRAINER_STATE_NAME not in listed:
        problems.append(f"its {MANIFEST_NAME} does not list {TRAINER_STATE_NAME}")
    if not _has_weights(listed):
        problems.append(f"its {MANIFEST_NAME} does not list model weights (model.safetensors)")
    return problems + content_problems(path, manifest, MANIFEST_NAME, hashes=hashes)


def _unlisted_checkpoint_problems(path: str) -> list[str]:
    problems = []
    state = os.path.join(path, TRAINER_STATE_NAME)
    try:
        with open(state, encoding="utf-8") as handle:
            if not isinstance(json.load(handle).get("global_step"), int):
                problems.append(f"{TRAINER_STATE_NAME} has no global_step")
    except FileNotFoundError:
        problems.append(f"{TRAINER_STATE_NAME} is missing")
    except (OSError, ValueError, AttributeError) as error:
        problems.append(f"{TRAINER_STATE_NAME} is unreadable ({type(error).__name__})")
    entries = set(os.listdir(path))
    pickled = sorted(e for e in entries if e.startswith("pytorch_model") and e.endswith(".bin"))
    if pickled:
        problems.append(f"its weights are pickled ({', '.join(pickled)}), which stim_hf never loads")
    elif not _has_weights(entries):
        problems.append("model weights (model.safetensors) are missing")
    if not _sharded_framework(entries):  # DeepSpeed and FSDP keep the optimizer state in their own layout
        for name in ("optimizer.pt", "scheduler.pt"):
            if name not in entries:
                problems.append(f"{name} is missing, so training cannot continue exactly from it")
        if not any(e.startswith("rng_state") and e.endswith(".pth") for e in entries):
            problems.append("rng_state.pth is missing, so training cannot continue exactly from it")
    for file in sorted(Path(path).rglob("*")):
        if not file.is_file():
            continue
        name = file.relative_to(path).as_posix()
        if file.suffix == ".safetensors":
            problem = safetensors_problem(str(file))
        elif file.suffix in _TORCH_ARCHIVE_SUFFIXES:
            problem = _zip_problem(str(file))
        else:
            continue
        if problem:
            problems.append(f"{name} {problem}")
    return problems


def _sharded_framework(entries: set[str]) -> bool:
    """DeepSpeed (``latest``) or FSDP (``pytorch_model_fsdp*``) checkpoint layouts."""
    return "latest" in entries or any(e.startswith("pytorch_model_fsdp") for e in entries)


def _has_weights(entries: set[str]) -> bool:
    return _sharded_framework(entries) or bool(entries.intersection(_WEIGHT_FILES))


def safetensors_problem(path: str) -> str | None:
    """Why the safetensors file ``path`` cannot be read (a truncated or foreign header), or None; reads the header only."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()
    except Exception as error:  # safetensors raises its own error type for a bad header
        return f"is truncated or not a safetensors file ({error})"
    return None


def _zip_problem(path: str) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"is truncated or not a torch archive ({error})"
    return None


def list_checkpoints(output_dir: str) -> list[str]:
    """The ``checkpoint-N`` directories of ``output_dir``, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (checkpoint_step(name), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if checkpoint_step(name) is not None and os.path.isdir(os.path.join(output_dir, name))
    ]
    return [path for _, path in sorted(found)]


def find_last_complete_checkpoint(output_dir: str) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """The newest complete checkpoint of ``output_dir`` and the newer ones skipped, with their problems."""
    skipped: list[tuple[str, list[str]]] = []
    for path in reversed(list_checkpoints(output_dir)):
        problems = checkpoint_problems(path)
        if not problems:
            return path, skipped
        skipped.append((path, problems))
    return None, skipped


def describe_last_complete(output_dir: str) -> str:
    """What a resume from ``output_dir`` would start from, in words (after a failed write)."""
    last, _ = find_last_complete_checkpoint(output_dir)
    if last is None:
        return f"'{output_dir}' holds no complete checkpoint, so a resume would start the run over"
    return (
        f"nothing was lost: the last complete checkpoint, which a resume (resume_from_checkpoint: true) would use, "
        f"is '{last}'"
    )


def checkpoint_size(output_dir: str) -> str | None:
    """``a checkpoint of this run takes about 3.4 MB`` (its newest one, by its manifest), or None without one."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            with open(os.path.join(path, MANIFEST_NAME), encoding="utf-8") as handle:
                files = json.load(handle)["files"]
            size = sum(int(v) for v in files.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        return f"a checkpoint of this run takes about {describe_size(size)}"
    return None


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """Turn ``resume_from_checkpoint`` into the checkpoint directory to resume from, or None.

    ``None``/``False``/``"false"``: no resume. ``True``/``"true"``/``"last"``: the last complete
    checkpoint in ``output_dir`` (incomplete newer ones are skipped with a warning). A path: that
    checkpoint, which must be complete. Raises :class:`ConfigError` otherwise, naming what is
    wrong and what to do.
    """
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in _FALSE_WORDS):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in _TRUE_WORDS):
        last, skipped = find_last_complete_checkpoint(output_dir)
        for path, problems in skipped:
            logger.warning("skipping %s checkpoint %s: %s", _broken(problems), path, "; ".join(problems))
        if last is None:
            where = f"'{output_dir}' holds no checkpoint-* folder"
            if skipped:
                where = f"no checkpoint in '{output_dir}' is complete and undamaged ({_describe_skipped(skipped)})"
            raise ConfigError(
                f"resume_from_checkpoint=true but {where}; give the path of a complete checkpoint or start "
                "without resume_from_checkpoint"
            )
        logger.warning("resuming from %s, the last complete checkpoint in %s", last, output_dir)
        return last
    path = os.fspath(value)
    if not os.path.isdir(path):
        raise ConfigError(
            f"resume_from_checkpoint='{path}' is not a directory; give a checkpoint-* folder or 'true' for the "
            "last complete one in output_dir"
        )
    problems = checkpoint_problems(path)
    if problems:
        entries, inside = set(os.listdir(path)), list_checkpoints(path)
        if not entries & {MANIFEST_NAME, TRAINER_STATE_NAME} and not _has_weights(entries) and not inside:
            raise ConfigError(
                f"resume_from_checkpoint='{path}' is not a checkpoint folder (no {TRAINER_STATE_NAME}, no model "
                "weights); give a checkpoint-* folder of a run, or 'true' for the last complete one in output_dir"
            )
        if inside:
            last, _ = find_last_complete_checkpoint(path)
            example = f" (its last complete one is '{last}')" if last else ""
            raise ConfigError(
                f"resume_from_checkpoint='{path}' is a run's folder, not a checkpoint ({'; '.join(problems)}); give "
                f"one of its checkpoint-* folders{example}, or 'true' with output_dir '{path}'"
            )
        if _broken(problems) == "damaged":
            raise ConfigError(
                f"resume_from_checkpoint='{path}' is damaged ({'; '.join(problems)}), on disk or in a copy; copy it "
                "again from where it was written, or give an earlier checkpoint, or 'true' for the last complete one "
                "in output_dir"
            )
        raise ConfigError(
            f"resume_from_checkpoint='{path}' is incomplete ({'; '.join(problems)}), probably from an interrupted "
            "write or copy; give an earlier checkpoint, or 'true' for the last complete one in output_dir"
        )
    logger.info("resuming from %s", path)
    return path


def _broken(problems: Sequence[str]) -> str:
    """``damaged`` when a file's bytes differ from those written, else ``incomplete``."""
    return "damaged" if any(" damaged (the bytes differ" in problem for problem in problems) else "incomplete"


def _describe_skipped(skipped: Sequence[tuple[str, list[str]]]) -> str:
    return "; ".join(f"{os.path.basename(path)}: {', '.join(problems)}" for path, problems in skipped)


def check_checkpoint_matches_model(checkpoint: str, model: torch.nn.Module) -> None:
    """Raise :class:`ConfigError` if the checkpoint's weights do not fit ``model`` (names or shapes).

    Reads safetensors headers only, so resuming with another architecture or head size fails
    here with one clear message instead of inside ``load_state_dict`` after data loading.
    Checkpoints without ``model.safetensors`` (sharded, FSDP, DeepSpeed) are left to the Trainer.
    """
    weights = os.path.join(checkpoint, "model.safetensors")
    if not os.path.isfile(weights):
        return
    from safetensors import safe_open

    state = model.state_dict()
    expected = {name: tuple(t.shape) for name, t in state.items()}
    with safe_open(weights, framework="pt") as handle:
        stored = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    mismatched = [
        f"{name} {stored[name]} vs model {expected[name]}"
        for name in stored
        if name in expected and stored[name] != expected[name]
    ]
    unknown = sorted(set(stored) - set(expected))
    # save_pretrained keeps one of each group of tied tensors: a model tensor sharing memory with a
    # stored one is not missing.
    stored_memory = {state[name].data_ptr() for name in stored if name in state}
    missing = sorted(name for name in set(expected) - set(stored) if state[name].data_ptr() not in stored_memory)
    if mismatched or unknown or missing:
        details = mismatched[:3]
        if missing:
            details.append(f"{len(missing)} model tensors not in the checkpoint, e.g. {missing[:2]}")
        if unknown:
            details.append(f"{len(unknown)} checkpoint tensors not in the model, e.g. {unknown[:2]}")
        raise ConfigError(
            f"checkpoint '{checkpoint}' does not fit the model ({'; '.join(details)}); resume with the model "
            "configuration and labels it was trained with, or start a new run in another output_dir"
        )


def changed_training_arguments(checkpoint: str, current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The :data:`RESUME_SENSITIVE_ARGUMENTS` whose value in ``checkpoint``'s ``training_args.json`` differs from ``current``.

    ``current`` is this run's arguments as JSON values (``json.loads(args.to_json_string())``).
    A checkpoint without ``training_args.json`` (another tool) gives ``{}``.
    """
    try:
        saved = json.loads(Path(checkpoint, TRAINING_ARGS_JSON_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    return {
        name: (saved[name], current.get(name))
        for name in RESUME_SENSITIVE_ARGUMENTS
        if name in saved and saved[name] != current.get(name)
    }


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``"optim 'sgd' -> 'adamw_torch', seed 1 -> 2"``: what a resumed run changed."""
    return ", ".join(f"{name} {before!r} -> {after!r}" for name, (before, after) in changes.items())


def checkpoint_global_step(checkpoint: str) -> int | None:
    """The ``global_step`` in ``checkpoint``'s ``trainer_state.json``, or None if it cannot be read."""
    try:
        step = json.loads(Path(checkpoint, TRAINER_STATE_NAME).read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def state_load_error(checkpoint: str, what: str, error: Exception, changes: dict[str, tuple[Any, Any]]) -> ConfigError:
    """The :class:`ConfigError` for a ``what`` state of ``checkpoint`` that torch or the optimizer could not load."""
    if isinstance(error, pickle.UnpicklingError):
        reason = "it holds objects other than tensors and plain data, which are never unpickled here"
    else:
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        reason = f"{type(error).__name__}: {first_line}"
    changed = f"; this run changed {describe_changes(changes)}" if changes else ""
    return ConfigError(
        f"cannot load the {what} state of checkpoint '{checkpoint}' ({reason}){changed}. Resume with the arguments "
        f"it was trained with (its {TRAINING_ARGS_JSON_NAME}), or start a new run without resume_from_checkpoint "
        "(model_name_or_path starts one from its weights)"
    )


# --------------------------------------------------------------------------------------------------
# Exact augmentation replay
# --------------------------------------------------------------------------------------------------


class SeededBatchDataset(Dataset):
    """A map-style dataset whose random transforms are a function of ``(seed, batch indices)``.

    Why: the Trainer restores the global random state from ``rng_state.pth`` on resume, but
    accelerate's data loader fetches one batch ahead and the Trainer restores the state only
    after fetching the first batches of the resumed run, so transforms drawing from the global
    random state (torchvision's, ``random``, ``numpy.random``) would see a different state than in
    an uninterrupted run. Here each batch of indices is fetched under torch, ``random`` and
    ``numpy.random`` states seeded from the seed and the indices, and the previous states are
    restored afterwards: the augmentation of a batch no longer depends on when, or in which
    worker process, it is fetched. Different epochs shuffle differently, so a sample still gets a
    new augmentation every epoch. Costs a few microseconds per batch.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # Attributes the Trainer or samplers may look up (features, column_names, ...).
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def batch_seed(self, indices: Iterable[int]) -> int:
        """The 63-bit seed of the batch made of ``indices``."""
        digest = hashlib.blake2b(np.asarray([self.seed, *indices], dtype=np.int64).tobytes(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """Fetch a batch under random states derived from the seed and the batch's indices."""
        indices = [int(i) for i in indices]
        seed = self.batch_seed(indices)
        # Only the CPU generator: transforms run on the CPU, and torch.manual_seed would also reseed
        # (and fork_rng not restore) the accelerator's generators, at about 0.2 ms per batch.
        torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            getitems = getattr(self.dataset, "__getitems__", None)
            return list(getitems(indices)) if getitems else [self.dataset[i] for i in indices]
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def __getitem__(self, index: Any) -> Any:
        """One example, under the random state of a batch of that single index (other keys: the dataset's)."""
        if not isinstance(index, (int, np.integer)):
            return self.dataset[index]  # e.g. a column name, looked up by length-grouping samplers
        return self.__getitems__([int(index)])[0]


# --------------------------------------------------------------------------------------------------
# Debugging dumps of non-finite steps
# --------------------------------------------------------------------------------------------------


def write_nonfinite_report(
    directory: str, report: dict[str, Any], tensors: dict[str, torch.Tensor], name_suffix: str = ""
) -> None:
    """Write ``report<suffix>.json`` and ``batch<suffix>.safetensors`` (the batch's labels) into ``directory``."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    if tensors:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            os.path.join(directory, f"batch{name_suffix}.safetensors"),
        )
    with open(os.path.join(directory, f"report{name_suffix}.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1, default=str)

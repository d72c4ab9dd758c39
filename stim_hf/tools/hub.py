"""Sharing a model folder on the Hugging Face Hub: what it must hold, the checks made before any work, the upload.

``stim-hf export --push-to-hub REPO_ID`` and ``stim-hf search --export DIR --push-to-hub REPO_ID``
upload the folder they write with ``huggingface_hub`` (``create_repo`` + ``upload_folder``), as the
Trainer's ``push_to_hub`` does for a training run. Whether the Hub can be reached at all (not
offline, a token set) is checked before any model is loaded, so a long export or search never ends
in a refused upload.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from stim_hf.errors import ConfigError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PROCESSOR_FILE = "preprocessor_config.json"
CARD_FILE = "README.md"
# What a folder may hold besides the model: the export's record. Anything else (a stray file of the
# user's, a __pycache__) stays local.
EXTRA_FILES = ("export_info.json",)
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def is_offline() -> bool:
    """Whether the Hub is switched off here: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` now or at import."""
    now = any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE") for name in _OFFLINE_VARIABLES)
    return now or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def check_push_to_hub(repo_id: str, flag: str = "--push-to-hub") -> None:
    """Refuse ``repo_id`` before any work when it cannot be pushed to: a :class:`ConfigError` naming the problem and the fix.

    Why first: an export re-estimates statistics and a search scores hundreds of sub-networks; an
    upload refused after that wastes the run. Checks the repository id, offline mode and that a
    token is set (the token itself is checked by the Hub when the upload starts: a wrong one fails
    there, after the folder is written).
    """
    try:
        validate_repo_id(repo_id)
    except (HFValidationError, TypeError):
        raise ConfigError(
            f"{flag} {repo_id!r} is not a Hub repository id; give NAME or OWNER/NAME (letters, digits, '-', '_', '.')"
        ) from None
    if is_offline():
        raise ConfigError(
            f"{flag} {repo_id}: the Hub is switched off here (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); unset "
            f"it on a machine that is online, or leave out {flag} and upload the folder later with "
            f"'hf upload {repo_id} FOLDER'"
        )
    if not get_token():
        raise ConfigError(
            f"{flag} {repo_id}: no Hugging Face token is set, so nothing can be uploaded; log in with 'hf auth login' "
            "(or set HF_TOKEN to a token with write access) and run the command again"
        )


def code_files(folder: str | os.PathLike) -> list[str]:
    """The Python files that ``config.json``'s ``auto_map`` names (the model's own code), sorted; [] for none."""
    try:
        auto_map = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("auto_map") or {}
    except (OSError, ValueError):
        return []
    references = [ref for value in auto_map.values() for ref in (value if isinstance(value, list) else [value])]
    return sorted({ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in references if isinstance(ref, str)})


def shared_files(folder: str | os.PathLike) -> list[str]:
    """The files of ``folder`` a push uploads: config, weights, the model's code, processor, card, export record."""
    folder = Path(folder)
    wanted = {"config.json", *WEIGHT_FILES, PROCESSOR_FILE, CARD_FILE, *EXTRA_FILES, *code_files(folder)}
    index = folder / WEIGHT_FILES[1]
    if index.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):  # an unreadable index: the shards stay unknown
            wanted |= set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
    return sorted(name for name in wanted if (folder / name).is_file())


def missing_for_sharing(folder: str | os.PathLike) -> list[str]:
    """What a user of ``folder`` would need and it lacks: config, weights, the code ``auto_map`` names, processor, card.

    Empty when ``AutoModelForImageClassification.from_pretrained`` and ``pipeline("image-classification")``
    can load it with transformers alone (``trust_remote_code=True`` where it holds code).
    """
    present = set(shared_files(folder))
    missing = [name for name in ("config.json", PROCESSOR_FILE, CARD_FILE) if name not in present]
    if not present & set(WEIGHT_FILES):
        missing.append(WEIGHT_FILES[0])
    missing += [name for name in code_files(folder) if name not in present]
    return missing


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    commit_message: str,
    token: str | None = None,
    files: list[str] | None = None,
) -> str:
    """Upload ``folder`` (its :func:`shared_files`, or ``files``) to the model repository ``repo_id``; returns its URL.

    Creates the repository when it does not exist (private or public: the account's default).
    Refuses a folder that lacks what a user needs (:func:`missing_for_sharing`).
    """
    if files is None:
        missing = missing_for_sharing(folder)
        if missing:
            raise ConfigError(
                f"'{folder}' lacks {', '.join(missing)}, which a user of {repo_id} would need; nothing was uploaded"
            )
        files = shared_files(folder)
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=repo.repo_id, folder_path=str(folder), allow_patterns=files, commit_message=commit_message
    )
    return str(repo)

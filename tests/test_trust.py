"""Nothing in the package unpickles untrusted files or runs remote code (checked on the syntax tree),
and a saved model folder is loaded only when its weights are complete safetensors files."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from stim_hf.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[1] / "stim_hf"

# Calls that unpickle whatever file they are given.
PICKLE_LOADERS = {"pickle.load", "pickle.loads", "dill.load", "dill.loads", "joblib.load", "cloudpickle.load"}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``torch.serialization.load`` for ``ts.load`` after ``import torch.serialization as ts``; None if not a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local names bound by imports, mapped to what they refer to (``from torch import load as l``: l -> torch.load)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """Every call in ``source`` that could unpickle a file or trust remote code, as ``file:line: why``."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        keywords = {k.arg: k.value for k in node.keywords if k.arg is not None}
        where = f"{filename}:{node.lineno}"
        if name in ("torch.load", "torch.serialization.load") and not _is_true(keywords.get("weights_only")):
            found.append(f"{where}: {name} without weights_only=True")
        if name in PICKLE_LOADERS:
            found.append(f"{where}: {name} unpickles its input")
        if name in ("numpy.load", "np.load") and "allow_pickle" in keywords:
            value = keywords["allow_pickle"]
            if not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{where}: {name} with allow_pickle")
        if "trust_remote_code" in keywords:
            value = keywords["trust_remote_code"]
            if not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{where}: trust_remote_code={ast.unparse(value)}")
    return found


def test_scanner_sees_calls_not_comments():
    source = """
import torch
import torch as th
from torch import load as tload
import pickle
import numpy as np
from transformers import AutoModel
# torch.load(path) in a comment, and "torch.load(path)" in a string, are fine
text = "torch.load(path, weights_only=False)"
torch.load(path, weights_only=True)
AutoModel.from_pretrained(name, trust_remote_code=False)
th.load(path)
tload(path, weights_only=False)
torch.serialization.load(path, weights_only=flag)
pickle.loads(blob)
np.load(path, allow_pickle=True)
AutoModel.from_pretrained(name, trust_remote_code=True)
AutoModel.from_pretrained(name, trust_remote_code=trust)
"""
    found = unsafe_calls(source)
    assert [line.split(":")[1] for line in found] == ["12", "13", "14", "15", "16", "17", "18"], found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_package_never_unpickles_or_trusts_remote_code(path):
    assert unsafe_calls(path.read_text(encoding="utf-8"), str(path)) == []


# --------------------------------------------------------------------------------------------------
# Saved model folders: safetensors only, complete
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_model(tmp_path):
    """A tiny CIFAR ResNet saved with save_pretrained; returns (model, folder)."""
    import torch

    from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification

    torch.manual_seed(0)
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=14, widths=[8, 16, 32], num_labels=10))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    return model, folder


def _shard_index(folder: Path, weight_map: dict[str, str]) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_safetensors_model_loads(tmp_path, saved_model):
    import torch

    from stim_hf.training.modeling import load_saved_classifier

    model, _ = saved_model
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="50KB")
    assert not (folder / "model.safetensors").exists() and (folder / "model.safetensors.index.json").is_file()
    loaded = load_saved_classifier(folder)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


def test_shard_index_naming_pickled_or_missing_shards_is_refused(saved_model, monkeypatch):
    import torch

    from stim_hf.training.modeling import load_saved_classifier

    model, folder = saved_model
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # a pickle: never to be opened
    _shard_index(folder, dict.fromkeys(model.state_dict(), "pytorch_model.bin"))

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ConfigError, match=r"names shards that are not safetensors files \(pytorch_model\.bin"):
        load_saved_classifier(folder)
    _shard_index(folder, dict.fromkeys(model.state_dict(), "model-00001-of-00002.safetensors"))
    with pytest.raises(ConfigError, match=r"names shards that are not in the folder \(model-00001-of-00002"):
        load_saved_classifier(folder)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"model\.safetensors\.index\.json is unreadable"):
        load_saved_classifier(folder)


def test_truncated_safetensors_is_refused_by_name(saved_model, tmp_path, capsys):
    from stim_hf import cli
    from stim_hf.training.modeling import load_saved_classifier

    _, folder = saved_model
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted copy
    message = r"'.*model\.safetensors' is truncated or not a safetensors file .*; re-save or re-copy the model"
    with pytest.raises(ConfigError, match=message):
        load_saved_classifier(folder)
    assert cli.main(["export", str(folder), "--depths", "1,1,1", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stim-hf: error: checkpoint directory") and err.count("\n") == 1, err
    assert "is truncated or not a safetensors file" in err

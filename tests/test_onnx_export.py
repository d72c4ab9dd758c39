"""ONNX export checked in ONNX Runtime, int8 quantization, and the CIFAR ResNets' input resize under both exporters."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import perturb
from torch.nn import functional as F
from transformers import ResNetConfig, ResNetForImageClassification

from stim_hf.errors import ConfigError
from stim_hf.models.cifar_resnet import CifarResNetConfig, CifarResNetForImageClassification
from stim_hf.tools import onnx_export
from stim_hf.tools.onnx_export import OnnxCheckError, export_onnx, onnx_session, quantize_int8

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

QUICK = dict(latency_repeats=2, latency_warmup=1)
RECORD_KEYS = {
    "file", "exporter", "opset", "onnx_version", "onnxruntime_version", "check", "latency_ms", "threads", "warmup",
    "repeats", "size_bytes",
}  # fmt: skip


def cifar_resnet(**kwargs) -> CifarResNetForImageClassification:
    torch.manual_seed(0)
    config = CifarResNetConfig(depth=8, widths=[8, 16, 32], num_labels=10, **kwargs)
    return perturb(CifarResNetForImageClassification(config))


def hf_resnet() -> ResNetForImageClassification:
    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10
    )
    return perturb(ResNetForImageClassification(config))


FAMILIES = {"cifar_resnet": cifar_resnet, "hf_resnet": hf_resnet}


def images(n: int, size: int = 16, width: int | None = None, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, width or size, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def pytorch_logits(model, pixel_values) -> np.ndarray:
    return model(pixel_values=pixel_values).logits.numpy()


def session_logits(path: Path, pixel_values: torch.Tensor) -> np.ndarray:
    return onnx_session(path).run(["logits"], {"pixel_values": pixel_values.numpy()})[0]


# --------------------------------------------------------------------------------------------------
# The CIFAR ResNets' input resize: exportable, and bit for bit what it was
# --------------------------------------------------------------------------------------------------


def _old_resize(pixel_values: torch.Tensor, size: int) -> torch.Tensor:
    """The resize as it was written before the exporters were supported (Python's round: banker's rounding)."""
    if pixel_values.shape[-2] == size:
        return pixel_values
    height, width = pixel_values.shape[-2:]
    return F.interpolate(
        pixel_values, size=(size, max(1, round(width * size / height))), mode="bilinear", align_corners=False
    )


@pytest.mark.parametrize(
    "height, width, size",
    [
        (16, 16, 11),  # square, down
        (8, 8, 11),  # square, up
        (16, 16, 16),  # its own size: untouched
        (16, 24, 11),  # wider: 16.5 -> 16 (banker's rounding; round half up would give 17)
        (16, 11, 8),  # 5.5 -> 6
        (16, 13, 8),  # 6.5 -> 6
        (20, 7, 9),  # 3.15 -> 3
        (32, 1, 3),  # below one pixel: 1
    ],
)
def test_resize_input_to_gives_the_old_formulas_logits_bit_for_bit(height, width, size):
    resized = cifar_resnet(resize_input_to=size)
    plain = CifarResNetForImageClassification(CifarResNetConfig(depth=8, widths=[8, 16, 32], num_labels=10)).eval()
    plain.load_state_dict(resized.state_dict())
    x = images(3, height, width)
    assert np.array_equal(pytorch_logits(resized, x), pytorch_logits(plain, _old_resize(x, size)))
    with torch.inference_mode():
        hidden = resized.resnet(x, output_hidden_states=True).hidden_states[0]
    assert tuple(hidden.shape[-2:]) == tuple(_old_resize(x, size).shape[-2:])


# --------------------------------------------------------------------------------------------------
# export_onnx
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_onnxruntime_gives_the_pytorch_logits_at_any_batch_size(name, tmp_path):
    model = FAMILIES[name]()
    path = tmp_path / "onnx" / "model.onnx"
    record = export_onnx(model, path, images(8), **QUICK)
    assert set(record) >= RECORD_KEYS and json.loads(json.dumps(record)) == record
    assert record["file"] == "model.onnx" and record["exporter"] == "dynamo" and record["opset"] >= 17
    assert record["check"]["images"] == 8 and record["check"]["argmax_agrees"] is True
    assert 0 <= record["check"]["max_abs_diff"] <= record["check"]["tolerance"]
    assert record["threads"] == record["onnxruntime_intra_op_threads"] == torch.get_num_threads()
    assert (record["warmup"], record["repeats"]) == (1, 2)
    for runtime in ("pytorch", "onnxruntime"):
        assert set(record["latency_ms"][runtime]) == {"batch_1", "batch_32"}
        assert all(ms > 0 for ms in record["latency_ms"][runtime].values())
    assert record["size_bytes"] == path.stat().st_size and sorted(p.name for p in path.parent.iterdir()) == [
        "model.onnx"
    ]  # the weights are inside the one file
    assert not model.training
    for batch in (1, 5):  # the batch axis is dynamic
        x = images(batch, seed=batch)
        np.testing.assert_allclose(session_logits(path, x), pytorch_logits(model, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_a_model_that_resizes_its_input_exports_with_both_exporters(dynamo, tmp_path):
    model = cifar_resnet(resize_input_to=11)
    path = tmp_path / "model.onnx"
    record = export_onnx(model, path, images(4, 16, 20), dynamo=dynamo, **QUICK)
    assert record["exporter"] == ("dynamo" if dynamo else "torchscript") and record["input_shape"] == [
        "batch",
        3,
        16,
        20,
    ]
    for batch in (1, 3):
        x = images(batch, 16, 20, seed=batch)
        np.testing.assert_allclose(session_logits(path, x), pytorch_logits(model, x), rtol=1e-4, atol=1e-4)


def test_a_file_that_does_not_match_is_refused_and_removed(tmp_path, monkeypatch):
    real = onnx_export.onnx_logits
    monkeypatch.setattr(onnx_export, "onnx_logits", lambda *a, **k: real(*a, **k) + 0.5)
    path = tmp_path / "model.onnx"
    with pytest.raises(OnnxCheckError, match=r"ONNX file '.*model\.onnx' does not match .*difference 0\.5 .*removed"):
        export_onnx(cifar_resnet(), path, images(4), **QUICK)
    assert not path.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("package", ["onnxruntime", "onnx"])
def test_missing_onnx_packages_name_the_extra(package, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=rf'need {package}, .*pip install "stim_hf\[onnx\]"'):
        export_onnx(cifar_resnet(), tmp_path / "model.onnx", images(2), **QUICK)
    with pytest.raises(ConfigError, match=r"stim_hf\[onnx\]"):
        quantize_int8(tmp_path / "model.onnx", tmp_path / "int8.onnx", images(2))
    assert list(tmp_path.iterdir()) == []


def test_stim_hf_imports_without_the_onnx_packages():
    """Only functions import onnx, onnxruntime and onnxscript (stim_hf installs without the extra)."""
    source = Path(onnx_export.__file__).read_text()
    top = [n for n in ast.parse(source).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] in ("onnx", "onnxruntime", "onnxscript")], names


# --------------------------------------------------------------------------------------------------
# int8
# --------------------------------------------------------------------------------------------------


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes, each a shift of the first channel's mean: a tiny network learns it in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=generator)
    x = torch.randn(n, 3, 16, 16, generator=generator)
    x[:, 0] += 1.5 * labels[:, None, None].float() - 2.25
    return x, labels


def test_int8_quantization_writes_a_smaller_file_that_keeps_the_accuracy(tmp_path):
    torch.manual_seed(0)
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=8, widths=[8, 16, 32], num_labels=4))
    train_x, train_y = _separable(512, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(40):
        batch = slice(64 * (step % 8), 64 * (step % 8 + 1))
        loss = F.cross_entropy(model(pixel_values=train_x[batch]).logits, train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    valid_x, valid_y = _separable(256, seed=1)
    fp32 = tmp_path / "model.onnx"
    export_onnx(model, fp32, valid_x[:32], **QUICK)
    record = quantize_int8(fp32, tmp_path / "model_int8.onnx", train_x[:128], (valid_x, valid_y), **QUICK)
    assert json.loads(json.dumps(record)) == record
    assert record["file"] == "model_int8.onnx" and record["format"] == "QDQ" and record["calibration"]["images"] == 128
    assert record["size_bytes"]["int8"] == (tmp_path / "model_int8.onnx").stat().st_size
    assert record["size_bytes"]["int8"] < 0.7 * record["size_bytes"]["fp32"]
    top1 = record["top1"]
    assert top1["images"] == 256 and top1["fp32"] > 0.8, top1  # learnt: chance is 0.25
    assert top1["int8"] >= top1["fp32"] - 0.05, top1
    assert all(ms > 0 for runtime in record["latency_ms"].values() for ms in runtime.values())
    # Most images keep their class; a wide margin, no single floating-point path.
    fp32_classes = onnx_export.onnx_logits(onnx_session(fp32), valid_x).argmax(1)
    int8_classes = onnx_export.onnx_logits(onnx_session(tmp_path / "model_int8.onnx"), valid_x).argmax(1)
    assert (fp32_classes == int8_classes).mean() >= 0.9
    # A given fp32 accuracy is recorded as given, not measured again.
    again = quantize_int8(fp32, tmp_path / "again.onnx", train_x[:64], (valid_x, valid_y), fp32_accuracy=0.5, **QUICK)
    assert again["top1"]["fp32"] == 0.5 and again["top1"]["fp32_from"].startswith("given")

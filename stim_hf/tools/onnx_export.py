"""An image classifier as one ONNX file, checked against ONNX Runtime and timed, and its int8 quantization.

:func:`export_onnx` writes ``model.onnx`` (input ``pixel_values``, output ``logits``, any batch size), runs it in
ONNX Runtime on real images beside PyTorch and refuses (removing the file) a file whose logits differ beyond a
tolerance, and times both runtimes at batch 1 and 32 on this CPU with the same threads. :func:`quantize_int8`
turns such a file into a static int8 one (QDQ, calibrated on training images) and scores both on labelled
images. The ONNX packages are an optional extra (``pip install "stim_hf[onnx]"``), imported only when called.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from stim_hf.errors import ConfigError, StimError

__all__ = [
    "INPUT_NAME",
    "ONNX_EXTRA",
    "OUTPUT_NAME",
    "ClassifierLogits",
    "OnnxCheckError",
    "export_onnx",
    "onnx_accuracy",
    "onnx_logits",
    "onnx_session",
    "onnxruntime_latency_ms",
    "quantize_int8",
    "require_onnx",
    "write_onnx",
]

ONNX_EXTRA = 'pip install "stim_hf[onnx]"'
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
LATENCY_BATCH_SIZES = (1, 32)
# ONNX's protobuf limit: above it the weights go to a file beside the model (``model.onnx.data``).
EXTERNAL_DATA_BYTES = 2 * 1024**3
# Static int8 with one scale per output channel of each weight, not one per tensor. Measured on a CIFAR ResNet-20
# trained briefly (5,000 CIFAR-10 images, 4 epochs, 49.6 % top-1 on 2,000 test images; 512 calibration images),
# ONNX Runtime 1.32 on an AVX2 CPU: per channel, the int8 file agrees with the fp32 one on the argmax of 97.8 % of
# the images (mean |logit difference| 0.033), per tensor on 96.4 % (0.039); top-1 49.9 against 49.6 %, size
# 331 against 320 kB, the same latency within noise. Activations are per tensor either way (int8, QDQ).
PER_CHANNEL = True


class OnnxCheckError(StimError, RuntimeError):
    """An exported ONNX file does not compute what the PyTorch model computes (it is removed)."""


def require_onnx() -> tuple[ModuleType, ModuleType]:
    """``(onnx, onnxruntime)``, or a :class:`ConfigError` naming the extra that installs them.

    The dynamo exporter also needs ``onnxscript``, which the extra installs with them; it is checked here too so that
    a missing package is named before any model is exported or any data is loaded.
    """
    missing = []
    modules = {}
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            modules[name] = __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"ONNX export and ONNX Runtime need {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed; install the extra: {ONNX_EXTRA}"
        )
    return modules["onnx"], modules["onnxruntime"]


class ClassifierLogits(nn.Module):
    """A Hugging Face image classifier as ``pixel_values -> logits`` (one tensor in, one out: what ONNX holds)."""

    def __init__(self, model: nn.Module, forward_kwargs: dict[str, Any] | None = None) -> None:
        """Wrap ``model``; ``forward_kwargs`` go to every call (e.g. ``interpolate_pos_encoding=True``)."""
        super().__init__()
        self.model = model
        self.forward_kwargs = dict(forward_kwargs or {})

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's logits for ``pixel_values`` ``(B, C, H, W)``."""
        output = self.model(pixel_values=pixel_values, **self.forward_kwargs)
        return output.logits if hasattr(output, "logits") else output[0]


@contextlib.contextmanager
def _on_cpu_in_eval(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode on the CPU (a copy when it lives elsewhere); its mode is restored afterwards."""
    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    target = model if on_cpu else copy.deepcopy(model).cpu()
    was_training = model.training
    target.eval()
    try:
        yield target
    finally:
        model.train(was_training)


def write_onnx(
    model: nn.Module,
    path: str | Path,
    example: torch.Tensor,
    *,
    dynamo: bool = True,
    forward_kwargs: dict[str, Any] | None = None,
) -> str:
    """Write ``model`` (eval mode, on the CPU) to ``path`` with a dynamic batch axis; returns the exporter's name.

    ``example`` is a batch at the size the model is fed; its spatial size is fixed in the file. Unchecked: see
    :func:`export_onnx`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Two examples at least: torch.export specialises a dimension it sees as 1, and the batch must stay dynamic.
    example = example.detach().to("cpu", torch.float32)
    example = example[:2] if example.shape[0] >= 2 else example[:1].expand(2, *example.shape[1:]).contiguous()
    wrapper = ClassifierLogits(model, forward_kwargs).eval()
    if dynamo:
        # The default, torch.export-based exporter: it exports every family stim_hf trains (the HF ResNets,
        # RegNets, ConvNeXts, ViTs, the CIFAR ResNets with or without resize_input_to) and is the one torch
        # maintains; the TorchScript exporter (dynamo=False, what optimum calls) is deprecated since torch 2.9
        # and kept here for comparison.
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
            verbose=False,
        )
        # Weights inside the one file; in a file beside it (model.onnx.data) only above ONNX's 2 GB limit.
        program.save(str(path), external_data=_initializer_bytes(program) > EXTERNAL_DATA_BYTES)
        return "dynamo"
    torch.onnx.export(
        wrapper,
        (example,),
        str(path),
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    return "torchscript"


def _initializer_bytes(program: Any) -> int:
    return sum(
        int(v.const_value.nbytes) for v in program.model.graph.initializers.values() if v.const_value is not None
    )


def onnx_session(model: str | Path | bytes, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of ``model`` (a path or serialised bytes) with ``threads`` intra-op threads.

    ``threads`` defaults to ``torch.get_num_threads()``, so ONNX Runtime and PyTorch are timed on the same cores.
    """
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: no warnings about unused initializers
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_logits(session: Any, images: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The logits ``session`` gives for ``images`` ``(N, C, H, W)``, run ``batch_size`` at a time."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    array = array.astype(np.float32, copy=False)
    parts = [
        session.run([OUTPUT_NAME], {INPUT_NAME: array[i : i + batch_size]})[0] for i in range(0, len(array), batch_size)
    ]
    return np.concatenate(parts)


def onnx_accuracy(
    path: str | Path, images: torch.Tensor, labels: torch.Tensor | np.ndarray, batch_size: int = 256
) -> float:
    """Top-1 accuracy of the ONNX file ``path`` on ``images`` with ``labels``, in ONNX Runtime on the CPU."""
    predictions = onnx_logits(onnx_session(path), images, batch_size).argmax(axis=1)
    truth = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return float((predictions == truth).mean())


def onnxruntime_latency_ms(
    session: Any, image_shape: tuple[int, ...], batch_size: int, warmup: int = 3, repeats: int = 20
) -> float:
    """Median wall time (ms) of one ``session.run`` on a random batch of ``batch_size`` images of ``image_shape``."""
    pixels = np.random.default_rng(0).standard_normal((batch_size, *image_shape), dtype=np.float32)
    times = []
    for index in range(warmup + repeats):
        start = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def _pytorch_latency_ms(
    model: nn.Module, image_shape: tuple[int, ...], batch_size: int, warmup: int, repeats: int, forward_kwargs: dict
) -> float:
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((batch_size, *image_shape), dtype=np.float32))
    times = []
    for index in range(warmup + repeats):
        start = time.perf_counter()
        model(pixel_values=pixels, **forward_kwargs)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _files_of(path: Path) -> list[Path]:
    """``path`` and the external data files its initializers name."""
    import onnx

    files = [path]
    if path.is_file():
        proto = onnx.load(str(path), load_external_data=False)
        for tensor in proto.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                location = next((e.value for e in tensor.external_data if e.key == "location"), None)
                if location and path.parent / location not in files:
                    files.append(path.parent / location)
    return files


def _remove(path: Path) -> None:
    for file in _files_of(path):
        file.unlink(missing_ok=True)


def _size_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in _files_of(path) if file.is_file())


def _opset(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def export_onnx(
    model: nn.Module,
    path: str | Path,
    images: torch.Tensor,
    *,
    latency_repeats: int = 20,
    latency_warmup: int = 3,
    dynamo: bool = True,
    forward_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model`` to the ONNX file ``path``, check it in ONNX Runtime on ``images`` and time both runtimes.

    ``model`` is a Hugging Face image classifier (called with ``pixel_values=``; its ``.logits`` are exported);
    ``images`` real images ``(N, C, H, W)`` at the size it is fed, which the file keeps (the batch is dynamic).
    The check runs the file in ONNX Runtime (CPU) and the model in PyTorch on every image: a largest logit
    difference above ``1e-3 * max|logit| + 1e-4`` raises :class:`OnnxCheckError` naming the file and the
    difference, and removes the file. Latency: the median of ``latency_repeats`` timed passes after
    ``latency_warmup`` untimed ones, at batch 1 and 32, in PyTorch and ONNX Runtime with the same number of threads
    (``torch.get_num_threads()``). ``dynamo=False`` uses the TorchScript exporter instead. Returns the record (JSON).
    """
    onnx, ort = require_onnx()
    path = Path(path)
    kwargs = dict(forward_kwargs or {})
    images = images.detach().to("cpu", torch.float32)
    if images.ndim != 4 or images.shape[0] < 1:
        raise ConfigError(f"images must be a batch (N, C, H, W) with N >= 1, got shape {tuple(images.shape)}")
    threads = torch.get_num_threads()
    with _on_cpu_in_eval(model) as cpu_model:
        try:
            exporter = write_onnx(cpu_model, path, images, dynamo=dynamo, forward_kwargs=kwargs)
            session = onnx_session(path, threads)
            with torch.inference_mode():
                expected = torch.cat(
                    [ClassifierLogits(cpu_model, kwargs)(images[i : i + 64]) for i in range(0, len(images), 64)]
                ).numpy()
            got = onnx_logits(session, images, batch_size=64)
            diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
            tolerance = 1e-3 * float(np.abs(expected).max()) + 1e-4
            if not diff <= tolerance:
                raise OnnxCheckError(
                    f"the ONNX file '{path}' does not match the PyTorch model: largest logit difference {diff:.3g} "
                    f"on {len(images)} images (shape {got.shape} against {expected.shape}), over the tolerance "
                    f"{tolerance:.3g}; the file was removed"
                )
            shape = tuple(int(d) for d in images.shape[1:])
            latency: dict[str, dict[str, float]] = {"pytorch": {}, "onnxruntime": {}}
            for batch in LATENCY_BATCH_SIZES:
                latency["pytorch"][f"batch_{batch}"] = _pytorch_latency_ms(
                    cpu_model, shape, batch, latency_warmup, latency_repeats, kwargs
                )
                latency["onnxruntime"][f"batch_{batch}"] = onnxruntime_latency_ms(
                    session, shape, batch, latency_warmup, latency_repeats
                )
        except BaseException:
            _remove(path)  # never left behind as if good
            raise
    return {
        "file": path.name,
        "exporter": exporter,
        "opset": _opset(path),
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "torch_version": torch.__version__,
        "input_shape": ["batch", *shape],
        "check": {
            "images": len(images),
            "max_abs_diff": diff,
            "tolerance": tolerance,
            "argmax_agrees": bool((got.argmax(axis=1) == expected.argmax(axis=1)).all()),
        },
        "latency_ms": latency,
        "latency_device": "cpu",
        "threads": threads,
        "onnxruntime_intra_op_threads": threads,
        "warmup": latency_warmup,
        "repeats": latency_repeats,
        "size_bytes": _size_bytes(path),
    }


class _ImageBatches:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over a tensor of images, ``batch_size`` at a time."""

    def __init__(self, images: torch.Tensor, batch_size: int) -> None:
        array = images.detach().to("cpu", torch.float32).numpy()
        self._batches = [array[i : i + batch_size] for i in range(0, len(array), batch_size)]
        self._next = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._next, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._next = iter(self._batches)


def quantize_int8(
    onnx_path: str | Path,
    output_path: str | Path,
    calibration_images: torch.Tensor,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    fp32_accuracy: float | None = None,
    *,
    per_channel: bool = PER_CHANNEL,
    calibration_batch_size: int = 32,
    latency_repeats: int = 20,
    latency_warmup: int = 3,
) -> dict[str, Any]:
    """Static int8 quantization of the ONNX file ``onnx_path`` into ``output_path``, in ONNX Runtime.

    ``quant_pre_process`` first (shape inference and graph optimisation: convolutions and batch norms fused, as
    ONNX Runtime recommends before quantizing), then ``quantize_static`` in QDQ format with int8 activations and
    weights (per output channel unless ``per_channel=False``), activation ranges (MinMax) calibrated on
    ``calibration_images`` (training images, at the size the model is fed). With ``validation`` (images, labels):
    the top-1 of the fp32 file (``fp32_accuracy`` when given, e.g. measured just before, instead of scoring it
    again) and of the int8 file, and ONNX Runtime latency of both at batch 1 and 32 (median of ``latency_repeats``
    after ``latency_warmup``). Returns the record (JSON).
    """
    _, ort = require_onnx()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, output = Path(onnx_path), Path(output_path)
    if not source.is_file():
        raise ConfigError(f"the ONNX file '{source}' does not exist; write it first (export_onnx)")
    calibration_images = calibration_images.detach().to("cpu", torch.float32)
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            prepared = Path(scratch) / "preprocessed.onnx"
            quant_pre_process(str(source), str(prepared))
            quantize_static(
                str(prepared),
                str(output),
                _ImageBatches(calibration_images, calibration_batch_size),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    record: dict[str, Any] = {
        "file": output.name,
        "source": source.name,
        "format": "QDQ",
        "activations": "int8, per tensor",
        "weights": "int8, per channel" if per_channel else "int8, per tensor",
        "calibration": {"images": len(calibration_images), "method": "MinMax", "pre_processed": True},
        "onnxruntime_version": ort.__version__,
        "seconds": time.perf_counter() - started,
        "size_bytes": {"fp32": _size_bytes(source), "int8": _size_bytes(output)},
    }
    if validation is not None:
        images, labels = validation
        images = images.detach().to("cpu", torch.float32)
        measured = fp32_accuracy is None
        fp32 = onnx_accuracy(source, images, labels) if measured else float(fp32_accuracy)
        int8 = onnx_accuracy(output, images, labels)
        record["top1"] = {
            "images": len(images),
            "fp32": fp32,
            "fp32_from": "the fp32 ONNX file, measured" if measured else "given (fp32_accuracy)",
            "int8": int8,
            "int8_minus_fp32": int8 - fp32,
        }
        shape = tuple(int(d) for d in images.shape[1:])
        threads = torch.get_num_threads()
        record["latency_ms"] = {
            name: {
                f"batch_{batch}": onnxruntime_latency_ms(session, shape, batch, latency_warmup, latency_repeats)
                for batch in LATENCY_BATCH_SIZES
            }
            for name, session in (
                ("onnxruntime_fp32", onnx_session(source, threads)),
                ("onnxruntime_int8", onnx_session(output, threads)),
            )
        }
        record.update(threads=threads, warmup=latency_warmup, repeats=latency_repeats)
    return record

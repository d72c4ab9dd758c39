"""``stim-hf search --latency-runtime onnxruntime``: candidates timed as ONNX files in ONNX Runtime."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_export import perturbed

from stim_hf.cli import main as cli_main
from stim_hf.data.image_datasets import DataArguments
from stim_hf.errors import ConfigError
from stim_hf.tools.search import SearchArguments, search_subnets

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

DIGITS = ["--dataset_name", "sklearn:digits", "--image_size", "16"]
# Small scored and re-estimation sets, few timed passes, a serving batch of 4: the latency is what is tested.
QUICK = dict(
    holdout_samples=96, recalibrate_bn=64, batch_size=32, progress=False, halving_rounds=1, latency_warmup=1,
    latency_repeats=2, serving_batch_size=4,
)  # fmt: skip


def digits() -> DataArguments:
    return DataArguments(dataset_name="sklearn:digits", image_size=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved CIFAR ResNet-14 (2 blocks per stage) with random weights and BatchNorm statistics."""
    path = tmp_path_factory.mktemp("search_onnx") / "resnet14"
    perturbed("cifar_resnet").save_pretrained(path)
    return str(path)


def test_front_latencies_come_from_onnxruntime_and_the_settings_say_so(checkpoint, tmp_path):
    args = SearchArguments(
        input_sizes="8,16", latency="front", latency_runtime="onnxruntime", output_dir=str(tmp_path), **QUICK
    )
    result = search_subnets([checkpoint], digits(), args)
    (searched,) = result.checkpoints
    timed = [c for c in searched.candidates if c.latency_ms is not None]
    front = [c for c in searched.candidates if c.pareto_flops]
    assert front and set(map(id, front)) <= set(map(id, timed))
    assert all(c.latency_ms > 0 and c.serving_latency_ms > 0 for c in timed)
    assert any(c.input_size == 8 for c in timed)  # exported at the candidate's own input size
    settings = json.loads((tmp_path / "pareto.json").read_text())["settings"]
    assert settings["latency_runtime"] == "onnxruntime" and settings["latency_device"] == "cpu"
    assert settings["onnxruntime"]["intra_op_threads"] == torch.get_num_threads() == settings["torch_threads"]
    assert settings["onnxruntime"]["provider"] == "CPUExecutionProvider"


def test_a_latency_budget_below_the_cheapest_candidate_names_onnxruntime(checkpoint):
    args = SearchArguments(
        input_sizes="8", budget="latency_ms=0.000001", latency_runtime="onnxruntime", output_dir=None, **QUICK
    )
    with pytest.raises(ConfigError, match=r"needs \d+\.\d+ ms in ONNX Runtime on the CPU; raise the budget"):
        search_subnets([checkpoint], digits(), args)


def test_the_pytorch_runtime_stays_the_default(checkpoint):
    assert SearchArguments().latency_runtime == "pytorch"
    result = search_subnets(
        [checkpoint], digits(), SearchArguments(input_sizes="8", latency="front", output_dir=None, **QUICK)
    )
    assert result.settings["latency_runtime"] == "pytorch" and "onnxruntime" not in result.settings
    assert result.settings["latency_device"] == "cpu"


def test_an_unknown_runtime_is_refused():
    with pytest.raises(ConfigError, match=r"latency_runtime='tensorrt' is not valid; choose one of: pytorch, onnxrun"):
        SearchArguments(latency_runtime="tensorrt")


def test_missing_onnxruntime_is_named_before_any_data_is_loaded(checkpoint, tmp_path, monkeypatch, capsys):
    import stim_hf.tools.search.images as images

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    monkeypatch.setattr(images, "load_image_datasets", lambda *a, **k: pytest.fail("data loaded before the check"))
    argv = ["search", checkpoint, *DIGITS, "--output-dir", str(tmp_path / "out"), "--latency-runtime", "onnxruntime"]
    assert cli_main([*argv, "--progress", "false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stim-hf: error: ") and err.count("\n") == 0, err
    assert 'need onnxruntime, which is not installed; install the extra: pip install "stim_hf[onnx]"' in err
    assert not (tmp_path / "out").exists()

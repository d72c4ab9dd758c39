"""Deploying: one folder for every budget (``stim-hf export CHECKPOINT --front SEARCH_DIR``, ``model.set_budget``),
and ONNX files checked in ONNX Runtime (``--onnx``, ``--int8``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file
from test_export import perturbed
from transformers import AutoModelForImageClassification

from stim_hf.cli import main as cli_main
from stim_hf.cli.train import main as train_main
from stim_hf.data.builtin_datasets import load_builtin_dataset
from stim_hf.training.integrity import folder_problems

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")
SEARCH = ["--holdout-samples", "96", "--recalibrate-bn", "64", "--progress", "false", "--input-sizes", "8,12,16"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A short quickstart training, its search (3 input sizes, latency of the front) and its switching folder."""
    base = tmp_path_factory.mktemp("budget")
    run, search, switch = base / "run", base / "search", base / "switch"
    train_main([
        QUICKSTART, "--output_dir", str(run), "--max_steps", "24", "--eval_strategy", "no", "--report_to", "none",
        "--num_eval_subnets", "0", "--subnet_monitor_count", "0", "--disable_tqdm", "true",
    ])  # fmt: skip
    assert cli_main(["search", str(run), "--config", QUICKSTART, *SEARCH, "--output-dir", str(search)]) == 0
    assert cli_main(["export", str(run), "--front", str(search), "--output", str(switch)]) == 0
    return {"run": run, "search": search, "switch": switch, "base": base}


def points_of(folder) -> list[dict]:
    return json.loads((folder / "config.json").read_text())["budget_front"]


def load(folder):
    return AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()


# --------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------


def test_the_folder_holds_the_searched_front_once_and_is_sealed(cifar):
    switch, search = cifar["switch"], json.loads((cifar["search"] / "pareto.json").read_text())
    front = search["checkpoints"][0]["pareto_flops"]
    points = points_of(switch)
    assert len(points) == len(front) >= 2
    assert [(p["depths"], p["input_size"]) for p in points] == [(f["depths"], f["input_size"]) for f in front]
    assert [p["accuracy"] for p in points] == [f["accuracy"] for f in front]
    assert all(p["latency_ms"] > 0 for p in points)  # the search timed its front
    assert len({p["input_size"] for p in points}) >= 2 or len({tuple(p["depths"]) for p in points}) >= 2
    assert folder_problems(switch) == []  # every file is in the manifest, as written
    info = json.loads((switch / "export_info.json").read_text())
    sizes = info["size_bytes"]
    assert sizes["full_model_weights"] < sizes["switching_weights"] <= 1.05 * sizes["full_model_weights"]
    weights = load_file(str(switch / "model.safetensors"))
    full = load_file(str(cifar["run"] / "model.safetensors"))
    assert all(torch.equal(weights[k], full[k]) for k in full)  # the full network's own tensors, unchanged
    assert [k for k in weights if k.startswith("budget_statistics.")] == ["budget_statistics.pool"]
    pool, config = weights["budget_statistics.pool"], json.loads((switch / "config.json").read_text())
    assert pool.shape == (2, config["budget_statistics_size"])
    layers = [m for m in load(switch).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    used = sum(layers[j].num_features for p in points for j, _ in p["statistics"])
    assert pool.shape[1] < used  # segments the points share (same size, same blocks so far) are stored once
    card = (switch / "README.md").read_text()
    assert "set_budget(" in card and all(f"`{p['name']}`" in card for p in points)
    assert "budget-switching" in card.split("---")[1]  # a Hub tag in the metadata block
    for point in points:
        assert info["checks"]["max_abs_diff_to_standalone"][point["name"]] <= 1e-5


WITHOUT_STIM_HF = textwrap.dedent(
    """
    import json, sys
    sys.modules["stim_hf"] = None
    sys.path = [p for p in sys.path if p not in ("", ".") and not p.startswith({repo!r})]
    try:
        import stim_hf  # noqa: F401
        raise SystemExit("stim_hf is importable")
    except ImportError:
        pass
    import torch
    from safetensors.torch import save_file
    from transformers import pipeline

    switch, standalone, images = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])

    def logits(classify):
        out = classify(images, top_k=1000, function_to_apply="none")
        return torch.tensor([[d["score"] for d in sorted(o, key=lambda d: d["label"])] for o in out])

    classify = pipeline("image-classification", model=switch, trust_remote_code=True, device="cpu")
    tensors, report = {{}}, {{"module": type(classify.model).__module__, "points": classify.model.budget_points}}
    for name, folder in standalone.items():
        classify.model.set_budget(name)
        tensors[name + "/switch"] = logits(classify)
        alone = pipeline("image-classification", model=folder, trust_remote_code=True, device="cpu")
        tensors[name + "/alone"] = logits(alone)
    try:
        classify.model.set_budget(flops=1e-4)
    except ValueError as err:
        report["too_small"] = str(err)
    save_file(tensors, sys.argv[4])
    print(json.dumps(report))
    """
)


def test_a_pipeline_without_stim_hf_switches_to_each_point_with_its_standalone_exports_logits(cifar, tmp_path):
    points = points_of(cifar["switch"])
    standalone = {}
    for point in points:
        folder = tmp_path / point["name"]
        assert cli_main(["export", str(cifar["run"]), "--depths", ",".join(map(str, point["depths"])), "--input-size",
                         str(point["input_size"]), "--recalibrate-bn", "64", "--config", QUICKSTART,
                         "--output", str(folder)]) == 0  # fmt: skip
        standalone[point["name"]] = str(folder)
    images = []
    for i, image in enumerate(load_builtin_dataset("sklearn:digits")["train"].select(range(6))["image"]):
        images.append(str(tmp_path / f"{i}.png"))
        image.save(images[-1])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS=str(torch.get_num_threads())
    )
    outputs = tmp_path / "logits.safetensors"
    argv = [str(cifar["switch"]), json.dumps(standalone), json.dumps(images), str(outputs)]
    result = subprocess.run([sys.executable, "-c", WITHOUT_STIM_HF.format(repo=str(REPO_ROOT)), *argv],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report, tensors = json.loads(result.stdout.strip().splitlines()[-1]), load_file(str(outputs))
    assert report["module"].startswith("transformers_modules.")
    for point in points:
        switched, alone = tensors[point["name"] + "/switch"], tensors[point["name"] + "/alone"]
        assert switched.shape == (6, 10)
        torch.testing.assert_close(switched, alone, rtol=0, atol=1e-5)
    cheapest = points[0]
    assert f"the cheapest is '{cheapest['name']}'" in report["too_small"]


# --------------------------------------------------------------------------------------------------
# Switching
# --------------------------------------------------------------------------------------------------


def test_set_budget_picks_the_most_accurate_point_that_fits(cifar):
    model = load(cifar["switch"])
    points = model.budget_points
    best = max(points, key=lambda p: (p["accuracy"], -p["flops"]))
    assert model.active_budget["name"] == best["name"]  # the default: the most accurate point
    for limit in sorted({p["flop_share"] for p in points}):
        fitting = [p for p in points if p["flop_share"] <= limit]
        want = max(fitting, key=lambda p: (p["accuracy"], -p["flops"]))["name"]
        assert model.set_budget(flops=limit)["name"] == want
        assert model.set_budget(flops=float(max(p["flops"] for p in fitting)))["name"] == want  # absolute FLOPs
        latency = max(p["latency_ms"] for p in fitting)
        fits = [p for p in points if p["latency_ms"] <= latency]
        assert (
            model.set_budget(latency_ms=latency)["name"]
            == max(fits, key=lambda p: (p["accuracy"], -p["flops"]))["name"]
        )
    with pytest.raises(ValueError, match=f"no front point fits flops <= 0.1 %.*the cheapest is '{points[0]['name']}'"):
        model.set_budget(flops=0.001)
    with pytest.raises(ValueError, match="no front point fits latency_ms <= 1e-06"):
        model.set_budget(latency_ms=1e-6)
    with pytest.raises(ValueError, match="no front point is named 'huge'; the points are"):
        model.set_budget("huge")
    with pytest.raises(ValueError, match="exactly one of"):
        model.set_budget(points[0]["name"], flops=0.5)
    with pytest.raises(ValueError, match="must be a positive number"):
        model.set_budget(flops=-1)


def test_switching_leaves_no_trace_and_the_choice_is_saved(cifar, tmp_path):
    model = load(cifar["switch"])
    x = torch.randn(5, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = {}
    with torch.no_grad():
        for point in model.budget_points + model.budget_points[::-1]:
            model.set_budget(point["name"])
            out = model(pixel_values=x).logits
            if point["name"] in logits:
                torch.testing.assert_close(out, logits[point["name"]], rtol=0, atol=0)  # the same, whatever ran before
            logits[point["name"]] = out
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats untouched
    assert len({tuple(v.flatten()[:5].tolist()) for v in logits.values()}) == len(logits)  # every point differs
    # A point runs with its own statistics: with the full network's it would give other logits.
    point = model.budget_points[0]
    model.set_budget(point["name"])
    pool = model.budget_statistics.pool
    saved = pool.clone()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        own = model(pixel_values=x).logits
        for j, offset in point["statistics"]:
            n = layers[j].num_features
            pool[0, offset : offset + n], pool[1, offset : offset + n] = layers[j].running_mean, layers[j].running_var
        inherited = model(pixel_values=x).logits
        pool.copy_(saved)
        torch.testing.assert_close(model(pixel_values=x).logits, own, rtol=0, atol=0)
    assert not torch.allclose(own, inherited, atol=1e-3)
    # The chosen point is saved with the model and comes back on loading.
    model.set_budget(point["name"])
    model.save_pretrained(tmp_path / "saved")
    assert load(tmp_path / "saved").active_budget["name"] == point["name"]


# --------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------


def ort_logits(path, pixel_values):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"pixel_values": pixel_values.numpy()})[0])


def test_onnx_files_of_every_front_point_compute_what_the_switching_model_computes(cifar, tmp_path):
    out = tmp_path / "switch"
    assert cli_main(["export", str(cifar["run"]), "--front", str(cifar["search"]), "--output", str(out), "--onnx",
                     "--int8"]) == 0  # fmt: skip
    model = load(out)
    info = json.loads((out / "export_info.json").read_text())
    pixel_values = torch.rand(7, 3, 16, 16)  # the processor's size; each file resizes as its point does
    for point in model.budget_points:
        model.set_budget(point["name"])
        with torch.no_grad():
            want = model(pixel_values=pixel_values).logits
        torch.testing.assert_close(ort_logits(out / "onnx" / f"{point['name']}.onnx", pixel_values), want,
                                   rtol=0, atol=1e-4)  # fmt: skip
        record = info["onnx"][point["name"]]
        assert record["check"]["max_abs_diff"] <= 1e-4 and record["check"]["argmax_agrees"]
        assert all(v > 0 for runtime in record["latency_ms"].values() for v in runtime.values())
        int8 = record["int8"]
        assert (out / "onnx" / int8["file"]).is_file() and int8["size_bytes"]["int8"] < int8["size_bytes"]["fp32"]
        assert int8["top1"]["images"] == 360 and 0 <= int8["top1"]["int8"] <= 1
        assert abs(int8["top1"]["fp32"] - int8["top1"]["pytorch"]) < 0.01  # the fp32 file scores as PyTorch does
    assert folder_problems(out) == []  # the ONNX files are sealed in the manifest too
    card = (out / "README.md").read_text()
    assert "## ONNX" in card and f"onnx/{model.budget_points[0]['name']}.int8.onnx" in card


def test_a_standalone_export_below_its_trained_size_gets_a_checked_onnx_file(cifar, tmp_path, capsys):
    out = tmp_path / "export"
    assert cli_main(["export", str(cifar["run"]), "--depths", "1,2,2", "--input-size", "12", "--config", QUICKSTART,
                     "--output", str(out), "--onnx"]) == 0  # fmt: skip
    assert "model.onnx: largest logit difference to PyTorch" in capsys.readouterr().out
    exported = AutoModelForImageClassification.from_pretrained(out).eval()
    assert exported.config.resize_input_to == 12  # the file takes the processor's 16 px and resizes as training did
    pixel_values = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        want = exported(pixel_values=pixel_values).logits
    torch.testing.assert_close(ort_logits(out / "model.onnx", pixel_values), want, rtol=0, atol=1e-4)
    info = json.loads((out / "export_info.json").read_text())
    assert info["onnx"]["input_shape"] == ["batch", 3, 16, 16] and "int8" not in info["onnx"]
    assert "## ONNX" in (out / "README.md").read_text()
    # What cannot run is refused before anything is written.
    assert cli_main(["export", str(cifar["run"]), "--depths", "1,2,2", "--output", str(tmp_path / "b"), "--int8"]) != 0
    assert "--int8 quantizes the ONNX file: add --onnx" in capsys.readouterr().err
    assert cli_main(["export", str(cifar["run"]), "--depths", "1,2,2", "--output", str(tmp_path / "b"), "--onnx"]) != 0
    assert "--onnx checks the file in ONNX Runtime on real images: give the data" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------------------------
# A family transformers ships
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sizes", "native"),
    [
        ("hf_resnet", "8,12,16", "from transformers import ResNetConfig"),
        # Swin at its trained size: transformers 5 renames its saved keys by model_type on loading, which the
        # switching folder's type (swin_budget) must share, else its blocks load as missing (caught by the check).
        ("hf_swin", "16", "from transformers import SwinConfig"),
    ],
)
def test_a_front_of_a_family_transformers_ships_switches_through_a_small_wrapper(tmp_path, name, sizes, native):
    checkpoint, search, switch = tmp_path / "model", tmp_path / "search", tmp_path / "switch"
    perturbed(name).save_pretrained(checkpoint)
    search_args = [*SEARCH[:-1], sizes, "--latency", "none", "--output-dir", str(search)]
    assert cli_main(["search", str(checkpoint), "--dataset_name", "sklearn:digits", "--image_size", "16",
                     *search_args]) == 0  # fmt: skip
    assert cli_main(["export", str(checkpoint), "--front", str(search), "--output", str(switch)]) == 0
    assert sorted(p.name for p in switch.glob("*.py")) == ["budget_switching.py", "modeling_budget_switching.py"]
    assert native in (switch / "modeling_budget_switching.py").read_text()
    model = load(switch)
    original = AutoModelForImageClassification.from_pretrained(checkpoint).eval()
    assert all(
        torch.equal(v, original.state_dict()[k]) for k, v in model.state_dict().items() if k in original.state_dict()
    )
    info = json.loads((switch / "export_info.json").read_text())
    assert max(info["checks"]["max_abs_diff_to_standalone"].values()) <= 1e-5
    with pytest.raises(ValueError, match="this front has no latencies"):
        model.set_budget(latency_ms=5)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForImageClassification.from_pretrained(switch, trust_remote_code=False)
    assert model.config.model_type == f"{original.config.model_type}_budget"
    prefix = {"hf_resnet": "resnet.encoder.stages.", "hf_swin": "swin.encoder.layers."}[name]
    assert all(path.startswith(prefix) for path in model.config.budget_stages)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_front_refuses_what_it_cannot_take(cifar, tmp_path, capsys):
    run, search, out = str(cifar["run"]), str(cifar["search"]), str(tmp_path / "a")
    other = cifar["base"] / "other"
    perturbed("cifar_resnet").save_pretrained(other)
    cases = [
        (["--front", search, "--output", out, "--depths", "1,1,1", "--input-size", "8"], "drop --depths, --input-size"),
        (
            ["--front", str(tmp_path), "--output", out],
            "has no pareto.json: give the --output-dir of a 'stim-hf search'",
        ),
        (["--front", search], "--front needs --output DIR"),
        (["--front", search, "--output", str(cifar["switch"])], "--overwrite"),  # not empty
    ]
    for argv, message in cases:
        assert cli_main(["export", run, *argv]) != 0
        assert message in capsys.readouterr().err
    assert cli_main(["export", str(other), "--front", search, "--output", out]) != 0
    assert re.search(r"did not search '.*other' \(it searched '.*run'\)", capsys.readouterr().err)
    assert not (tmp_path / "a").exists()

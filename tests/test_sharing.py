"""Sharing a trained network: every folder stim_hf writes loads with transformers alone (stim_hf not importable),
runs in pipeline(), carries a Hub model card of measured accuracies, and is pushed only when it can be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO_ROOT
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_families import build
from transformers import AutoModelForImageClassification

import stim_hf.tools.hub as hub
from stim_hf.cli import main as cli_main
from stim_hf.cli.train import main as train_main
from stim_hf.data.builtin_datasets import load_builtin_dataset
from stim_hf.data.image_datasets import EvaluationDataArguments
from stim_hf.errors import ConfigError
from stim_hf.tools.export import export_subnet
from stim_hf.tools.hub import check_push_to_hub, missing_for_sharing, shared_files

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")
CODE = ["configuration_cifar_resnet.py", "modeling_cifar_resnet.py"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A few steps of the quickstart (CIFAR ResNet-20, digits): its output folder, one checkpoint, its metrics."""
    out = tmp_path_factory.mktemp("sharing") / "quickstart"
    metrics = train_main([
        QUICKSTART, "--output_dir", str(out), "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "4",
        "--eval_strategy", "no", "--report_to", "none", "--num_eval_subnets", "2",
        "--subnet_bn_recalibration_samples", "64", "--disable_tqdm", "true",
    ])  # fmt: skip
    return out, metrics


@pytest.fixture(scope="module")
def folders(run, tmp_path_factory):
    """Every kind of folder stim_hf writes: the training output, a checkpoint, an export, a search pick (below the
    trained size), and an export of an HF ResNet (a class transformers ships)."""
    out, _ = run
    base = tmp_path_factory.mktemp("shared")
    export, pick, resnet = base / "export", base / "pick", base / "resnet"
    assert cli_main(["export", str(out), "--depths", "1,2,2", "--output", str(export), "--config", QUICKSTART,
                     "--recalibrate-bn", "64", "--input-size", "12"]) == 0  # fmt: skip
    assert cli_main(["search", str(out), "--config", QUICKSTART, "--input-sizes", "11", "--budget", "flops=0.6",
                     "--holdout-samples", "96", "--recalibrate-bn", "64", "--latency", "none", "--progress", "false",
                     "--output-dir", str(base / "search"), "--export", str(pick)]) == 0  # fmt: skip
    data_args = EvaluationDataArguments(dataset_name="sklearn:digits", image_size=16, train_val_split=0.2)
    export_subnet(build("hf_resnet").eval(), [1, 2, 1], resnet, data_args=data_args, recalibrate_bn=64)
    return {
        "training output": out,
        "checkpoint": next(out.glob("checkpoint-*")),
        "export": export,
        "search pick": pick,
        "hf resnet export": resnet,
    }


# --------------------------------------------------------------------------------------------------
# Loading without stim_hf
# --------------------------------------------------------------------------------------------------

WITHOUT_STIM_HF = textwrap.dedent(
    """
    import json, sys
    sys.modules["stim_hf"] = None  # the editable install's finder cannot import it either
    sys.path = [p for p in sys.path if p not in ("", ".") and not p.startswith({repo!r})]
    try:
        import stim_hf  # noqa: F401
        raise SystemExit("stim_hf is importable")
    except ImportError:
        pass
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    folders, images = json.loads(sys.argv[1]), [Image.open(p) for p in json.loads(sys.argv[2])]
    tensors, report = {{}}, {{}}
    for name, folder in folders.items():
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
        pixel_values = AutoImageProcessor.from_pretrained(folder)(images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits = model(pixel_values=pixel_values).logits
        classify = pipeline("image-classification", model=folder, trust_remote_code=True, device="cpu")
        top1 = [result[0]["label"] for result in classify(images, top_k=1)]
        tensors[name + "/pixel_values"], tensors[name + "/logits"] = pixel_values.contiguous(), logits.contiguous()
        report[name] = {{"module": type(model).__module__, "class": type(model).__name__, "top1": top1,
                        "argmax": [model.config.id2label[i] for i in logits.argmax(-1).tolist()]}}
    save_file(tensors, sys.argv[3])
    print(json.dumps(report))
    """
)


def test_every_folder_loads_and_runs_in_a_pipeline_without_stim_hf(folders, tmp_path):
    images = []
    for i, image in enumerate(load_builtin_dataset("sklearn:digits")["train"].select(range(4))["image"]):
        images.append(str(tmp_path / f"{i}.png"))
        image.save(images[-1])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The same thread count as this process: the logits are compared to 1e-6, and another count sums in another order.
    env.update(
        HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS=str(torch.get_num_threads())
    )
    script = WITHOUT_STIM_HF.format(repo=str(REPO_ROOT))
    outputs = tmp_path / "outputs.safetensors"
    argv = [json.dumps({k: str(v) for k, v in folders.items()}), json.dumps(images), str(outputs)]
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report, tensors = json.loads(result.stdout.strip().splitlines()[-1]), load_file(str(outputs))

    for name, folder in folders.items():
        loaded = report[name]
        ours = AutoModelForImageClassification.from_pretrained(folder).eval()  # stim_hf imported here
        assert loaded["class"] == type(ours).__name__
        pixel_values = tensors[f"{name}/pixel_values"]
        with torch.no_grad():
            torch.testing.assert_close(tensors[f"{name}/logits"], ours(pixel_values=pixel_values).logits, rtol=0,
                                       atol=1e-6)  # fmt: skip
        assert loaded["top1"] == loaded["argmax"]  # pipeline() on PIL images = the model on the processor's output
        config = json.loads((folder / "config.json").read_text())
        if name == "hf resnet export":  # a class transformers ships: no code, the native class
            assert loaded["module"].startswith("transformers.models.resnet") and "auto_map" not in config
            assert not list(folder.glob("*.py"))
        else:
            assert loaded["module"].startswith("transformers_modules."), loaded  # the code saved beside the weights
            assert sorted(p.name for p in folder.glob("*.py")) == CODE
            assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForImageClassification"}

    # The pick and the export run below the trained size (16 px): their processors give 16 px inputs, which the
    # models' own code (loaded without stim_hf above) resizes to 11 and 12 px as training did.
    assert tensors["search pick/pixel_values"].shape[-2:] == (16, 16)
    assert tensors["export/pixel_values"].shape[-2:] == (16, 16)
    assert json.loads((folders["search pick"] / "config.json").read_text())["resize_input_to"] == 11
    assert json.loads((folders["export"] / "config.json").read_text())["resize_input_to"] == 12
    assert json.loads((folders["search pick"] / "export_info.json").read_text())["image_processor"] is True


def test_with_stim_hf_imported_its_registered_classes_load_a_folder_with_code(folders):
    """A folder with auto_map loads stim_hf's own classes, with or without trust_remote_code."""
    for trust in (False, None, True):
        model = AutoModelForImageClassification.from_pretrained(folders["export"], trust_remote_code=trust)
        assert type(model).__module__ == "stim_hf.models.cifar_resnet.modeling_cifar_resnet", trust


def test_a_model_object_exports_with_the_processor_of_the_folder_it_came_from(run, tmp_path):
    out, _ = run
    model = AutoModelForImageClassification.from_pretrained(out)
    export_subnet(model, [1, 1, 1], tmp_path / "api", input_size=12)
    processor = json.loads((tmp_path / "api" / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 16, "width": 16}  # the run's; the model resizes to 12 px itself
    assert json.loads((tmp_path / "api" / "config.json").read_text())["resize_input_to"] == 12
    assert json.loads((tmp_path / "api" / "export_info.json").read_text())["image_processor"] is True


# --------------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------------


def test_training_output_has_a_hub_card_of_its_measured_accuracies(run):
    out, metrics = run
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-classification"
    assert {"stim_hf", "stimulative-training", "sub-network", "stpp"} <= set(data["tags"])
    assert "datasets" not in data and "base_model" not in data  # builtin digits, trained from scratch
    measured = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert measured == {
        "Top-1 accuracy, full network": metrics["eval_accuracy"],
        "Top-5 accuracy, full network": metrics["eval_top5_accuracy"],
        "Top-1 accuracy, mean of 2 sub-networks, BatchNorm re-estimated on 64 training images each":
            metrics["eval_subnet_accuracy_mean"],
        "Top-1 accuracy, mean of 2 sub-networks, BatchNorm inherited": metrics["eval_subnet_accuracy_mean_inherited_bn"],
    }  # fmt: skip
    assert {r.dataset_type for r in card.data.eval_results} == {"sklearn:digits"}
    assert 'pipeline("image-classification", model="path/to/this/folder", trust_remote_code=True)' in card.text
    assert "stim_hf not installed" in card.text


def test_export_cards_name_their_source_and_measured_accuracies(folders):
    export = ModelCard.load(folders["export"] / "README.md")
    assert export.data.library_name == "transformers" and "cifar-resnet" in export.data.tags
    assert export.data.base_model is None  # a local source is no Hub repository
    assert export.data.eval_results is None  # no --evaluate: nothing measured, nothing claimed
    pick = ModelCard.load(folders["search pick"] / "README.md")
    info = json.loads((folders["search pick"] / "export_info.json").read_text())
    (result,) = pick.data.eval_results
    assert result.metric_value == info["search"]["accuracy"] and result.dataset_split == "train (held out)"
    assert "at 11 px, BatchNorm re-estimated" in result.metric_name
    resnet = ModelCard.load(folders["hf resnet export"] / "README.md")
    assert "trust_remote_code" not in resnet.text and "loads with transformers alone" in resnet.text


def test_card_header_of_a_hub_source_and_data_set(tmp_path):
    from stim_hf.tools.model_cards import export_card

    info = {
        "source": "someone/resnet-20-stpp", "base_model": "someone/resnet-20-stpp", "family": "hf_resnet",
        "model_class": "ResNetForImageClassification", "depths": [1], "full_depths": [2], "stages": ["s"],
        "num_parameters": 1, "full_num_parameters": 2, "dropped_block_parameters": 1, "input_size": 32,
        "image_processor": False, "bn_recalibration_samples": 0, "has_batchnorm": False, "seed": 1,
        "data": {"train": "uoft-cs/cifar10", "validation": "uoft-cs/cifar10, split 'test'", "image_size": 32,
                 "type": "uoft-cs/cifar10", "hub_dataset": "uoft-cs/cifar10"},
        "metrics": {"accuracy": 0.5, "top5_accuracy": 0.9, "num_samples": 10},
        "full_metrics": {"accuracy": 0.6, "top5_accuracy": 0.95, "num_samples": 10},
    }  # fmt: skip
    card = ModelCard(export_card(tmp_path, info))
    assert card.data.base_model == "someone/resnet-20-stpp" and card.data.datasets == ["uoft-cs/cifar10"]
    assert [r.metric_value for r in card.data.eval_results] == [0.5, 0.9, 0.6, 0.95]


# --------------------------------------------------------------------------------------------------
# Pushing
# --------------------------------------------------------------------------------------------------


def test_push_is_refused_offline_before_any_work(tmp_path, capsys):
    missing = str(tmp_path / "no-such-run")  # never looked at: the refusal comes first
    assert cli_main(["export", missing, "--depths", "1,1,1", "--output", str(tmp_path / "e"),
                     "--push-to-hub", "me/sub"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("stim-hf: error: --push-to-hub me/sub: the Hub is switched off here (HF_HUB_OFFLINE")
    assert err.count("\n") == 1 and "hf upload me/sub" in err
    argv = ["search", missing, "--dataset_name", "sklearn:digits", "--export", str(tmp_path / "p"),
            "--output-dir", str(tmp_path / "s"), "--push-to-hub", "me/pick"]  # fmt: skip
    assert cli_main(argv) == 2
    assert capsys.readouterr().err.startswith("stim-hf: error: --push-to-hub me/pick: the Hub is switched off")
    assert cli_main([*argv[:4], "--push-to-hub", "me/pick"]) == 2
    assert "add --export DIR" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_push_is_refused_without_a_token_or_with_a_bad_repository_id(monkeypatch):
    _online(monkeypatch, token=None)
    with pytest.raises(ConfigError, match=r"^--push-to-hub me/sub: no Hugging Face token is set.*'hf auth login'"):
        check_push_to_hub("me/sub")
    with pytest.raises(ConfigError, match=r"'a b' is not a Hub repository id"):
        check_push_to_hub("a b")


def test_push_uploads_exactly_what_a_user_needs(run, monkeypatch, tmp_path):
    out, _ = run
    calls = _online(monkeypatch, token="hf_test")
    export_subnet(out, [1, 2, 1], tmp_path / "e", push_to_hub="me/sub")
    needed = ["README.md", "config.json", *CODE, "export_info.json", "model.safetensors", "preprocessor_config.json"]
    assert shared_files(tmp_path / "e") == sorted(needed) and missing_for_sharing(tmp_path / "e") == []
    (create, repo), (upload, kwargs) = calls
    assert (create, repo, upload) == ("create_repo", "me/sub", "upload_folder")
    assert kwargs["folder_path"] == str(tmp_path / "e") and kwargs["allow_patterns"] == sorted(needed)
    (tmp_path / "e" / CODE[1]).unlink()
    assert missing_for_sharing(tmp_path / "e") == [CODE[1]]


def _online(monkeypatch, token: str | None) -> list:
    """Pretend the Hub is reachable with ``token``; returns the calls a fake ``HfApi`` receives."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub.huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "get_token", lambda: token)
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))
            return type("Repo", (), {"repo_id": repo_id, "__str__": lambda self: f"https://hf.co/{repo_id}"})()

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    return calls

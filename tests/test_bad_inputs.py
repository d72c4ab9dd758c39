"""Bad inputs: each is refused with one clear message (problem + fix) before training, or handled.

The catalogue in docs/reliability.md lists these together with the ones in test_config.py,
test_data.py, test_trainer.py, test_train_job.py and test_resume.py.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import TrainingArguments

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments, cli
from stim_hf.cli.train import check_model_source, resolve_resume_checkpoint
from stim_hf.data.image_datasets import DataArguments, load_image_datasets
from stim_hf.data.transforms import collate_image_batch, with_image_transforms
from stim_hf.errors import ConfigError, DataError
from stim_hf.training.config import ModelArguments

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")


def training_args(**kwargs) -> StimulativeTrainingArguments:
    return StimulativeTrainingArguments(**{"output_dir": "unused", "report_to": "none", "use_cpu": True, **kwargs})


# -- stimulative fields: property test -----------------------------------------------------------------

# The fields StimulativeTrainingArguments adds to TrainingArguments (the HF defaults it changes excluded).
STIM_FIELDS = sorted(
    f.name
    for f in dataclasses.fields(StimulativeTrainingArguments)
    if f.init and f.name not in TrainingArguments.__dataclass_fields__
)
VALID_WORDS = [
    "ct", "st", "stpp", "kl", "kl_direction", "prefix", "subset", "full", "0,1,1", "[0, 1, 2]", "constant",
    "cosine_up", "layernorm", "l2", "main_only", "recalibrate", "none", "stop", "skip", "summed", "sequential",
]  # fmt: skip
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-2, max_value=8),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=2.0),
    st.text(max_size=12),
    st.sampled_from(VALID_WORDS),
    st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=3), st.booleans()), max_size=5),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.dictionaries(st.sampled_from(STIM_FIELDS), ANY_VALUE, min_size=1, max_size=3))
def test_stimulative_fields_validate_or_raise_config_error(values):
    """Any value of any stimulative field is accepted or refused with a ConfigError, nothing else."""
    try:
        args = training_args(**values)
    except ConfigError as error:
        assert str(error) and "\n" not in str(error)
        return
    # Accepted: then the checked fields hold values of the documented kinds.
    assert args.stim_method in ("ct", "st", "stpp")
    assert isinstance(args.num_subnets, int) and args.num_subnets >= 0
    assert math.isfinite(args.kl_coef) and args.kl_coef >= 0
    assert 0 < args.min_input_scale <= 1
    assert args.sample_space == "full" or all(isinstance(v, int) and v >= 0 for v in args.sample_space)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("on_nonfinite_loss", "ignore", "on_nonfinite_loss='ignore' is not valid; choose one of: stop, skip"),
        ("stim_method", ["st"], r"stim_method=\['st'\] is not a method; valid: ct, st, stpp"),
        ("stim_method", "\n", r"stim_method='\\n' is not a method; valid: ct, st, stpp"),  # one line (hypothesis)
        ("kl_coef", 10**400, r"kl_coef=1000000.*\.\.\. must be a number in \[0.0, inf\)"),
        ("num_subnets", "2", "num_subnets='2' must be an integer"),
        ("kl_temperature", math.inf, "kl_temperature=inf must be a number"),
        ("normalize_main_logits", "yes", "normalize_main_logits='yes' must be true or false"),
        ("sample_space", [1, True], "sample_space=.* is not valid"),
        ("preset_departures", 1, "preset_departures=1 is not a list of field names; give them comma-separated"),
        ("preset_departures", ["kl_loss", 2], r"preset_departures=\['kl_loss', 2\] is not a list of field names"),
        ("preset_departures", "kl_los", "preset_departures names kl_los, which no method preset sets; valid: "),
    ],
)
def test_more_bad_stimulative_values(field, value, message):
    with pytest.raises(ConfigError, match=message):
        training_args(**{field: value})


# Every numeric TrainingArguments setting a run depends on: one line naming the field, the value and the range.
TRAINING_NUMBERS = {
    "per_device_train_batch_size": (0, r"per_device_train_batch_size=0 is out of range; valid: \[1, inf\)"),
    "per_device_eval_batch_size": (-8, r"per_device_eval_batch_size=-8 is out of range; valid: \[1, inf\)"),
    "num_train_epochs": (0, r"num_train_epochs=0 is out of range; valid: \(0.0, inf\)"),
    "max_steps": (0, r"max_steps=0 is out of range; valid: -1 \(train num_train_epochs\) or \[1, inf\)"),
    "gradient_accumulation_steps": (0, r"gradient_accumulation_steps=0 is out of range; valid: \[1, inf\)"),
    "learning_rate": (-0.1, r"learning_rate=-0.1 is out of range; valid: \(0.0, inf\)"),
    "warmup_steps": (2.5, r"warmup_steps=2.5 is neither a whole number of steps \(>= 1\) nor a share of the run"),
    "weight_decay": (math.nan, r"weight_decay=nan must be a number in \[0.0, inf\)"),
    "max_grad_norm": (-1.0, r"max_grad_norm=-1.0 is out of range; valid: \[0.0, inf\)"),
    "save_steps": (0, r"save_steps=0 is out of range; valid: \(0.0, inf\)"),
    "eval_steps": (12.5, r"eval_steps=12.5 is neither a whole number of steps .* eval_strategy is 'steps'"),
    "logging_steps": (-5, r"logging_steps=-5 is out of range"),
    "save_total_limit": (0, r"save_total_limit=0 is out of range; valid: \[1, inf\)"),
    "dataloader_num_workers": (-1, r"dataloader_num_workers=-1 is out of range; valid: \[0, inf\)"),
    "seed": (2**32, r"seed=4294967296 is out of range; valid: \[0, 4294967295\]"),
    "label_smoothing_factor": (1.0, r"label_smoothing_factor=1.0 is out of range; valid: \[0.0, 1.0\)"),
    "optim_args": ("momentum", r"optim_args='momentum' must be comma-separated key=value pairs"),
    "report_to": ("tensorbord", r"report_to='tensorbord' is not a logging integration; choose from .*tensorboard"),
}


@pytest.mark.parametrize("field", list(TRAINING_NUMBERS))
def test_training_settings_are_checked_at_parse(field):
    value, message = TRAINING_NUMBERS[field]
    extra = {"eval_strategy": "steps", "save_strategy": "steps", "logging_strategy": "steps"}
    with pytest.raises(ConfigError, match=message) as raised:
        training_args(**extra, **{field: value})
    assert "\n" not in str(raised.value)


def test_preset_departures_read_as_a_yaml_list_or_comma_separated():
    for value in (["kl_loss", " min_input_scale"], "min_input_scale, kl_loss", ("kl_loss", "min_input_scale")):
        args = training_args(stim_method="stpp", kl_loss="kl", min_input_scale=1.0, preset_departures=value)
        assert args.preset_departures == "kl_loss,min_input_scale"  # one form in training_args.json
    assert training_args(preset_departures=[]).preset_departures is None


def test_step_intervals_are_checked_only_where_their_strategy_uses_them():
    # The quickstart saves and evaluates every epoch: a save_steps it never reads is no error.
    args = training_args(save_strategy="epoch", eval_strategy="epoch", save_steps=2.5, eval_steps=0)
    assert args.save_steps == 2.5
    assert training_args(logging_steps=0.25, warmup_steps=0.1).logging_steps == 0.25  # shares of the run


# -- the command line: one line on stderr (after the progress lines of the work done before), exit status 2 ----

# Where stderr is a log, as pytest's capture is: loading the images writes "loading the images ..." and "...: done, 3 s".
PROGRESS_LINE = re.compile(r".+ \.\.\.|.+: done, \d+ s")


def run_cli(capsys, *argv: str) -> str:
    status = cli.main(["train", QUICKSTART, *argv])
    captured = capsys.readouterr()
    assert status == 2, captured
    assert "Traceback" not in captured.err
    *before, error = captured.err.strip().splitlines()
    assert error.startswith("stim-hf: error: "), captured.err
    assert all(PROGRESS_LINE.fullmatch(line) for line in before), captured.err
    assert captured.err.endswith("\n"), captured.err  # else the next output (a progress bar) goes on its line
    return error.removeprefix("stim-hf: error: ")


def test_an_error_that_stops_training_mid_progress_bar_gets_its_own_line(capsys, tmp_path, tiny_cifar_resnet):
    """A non-finite loss stops training with the Trainer's progress bar drawn: the error must not be glued to it."""
    from conftest import make_tensor_dataset

    args = StimulativeTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=False, stim_method="ct",
    )  # fmt: skip
    data = make_tensor_dataset(16, poisoned=3)
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=data)
    assert cli.run_guarded(trainer.train) == 2
    err = capsys.readouterr().err
    assert "0/2 [" in err  # the bar was drawn before the error
    error_line = next(line for line in err.split("\n") if "stim-hf: error: " in line)
    assert error_line.startswith("stim-hf: error: non-finite loss at training step 1"), err
    assert err.endswith(error_line + "\n"), err  # the last line, ended: no bar is drawn after it


def test_cli_wrong_type_is_one_line_not_the_usage(capsys, tmp_path):
    message = run_cli(capsys, "--num_subnets", "two", "--output_dir", str(tmp_path))
    assert message.startswith("argument --num_subnets/--num-subnets: invalid int value: 'two'")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(Path(QUICKSTART).read_text() + "kl_temperature: warm\n")
    status = cli.main(["train", str(recipe), "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "argument --kl_temperature/--kl-temperature: invalid float value: 'warm'" in err


def test_cli_bad_numbers_are_one_line_before_any_data_is_loaded(capsys, tmp_path, monkeypatch):
    import stim_hf.cli.train as train_command

    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the settings were checked")

    monkeypatch.setattr(train_command, "load_image_datasets", no_data)
    for flag, value, expected in [
        ("--per_device_train_batch_size", "0", "per_device_train_batch_size=0 is out of range; valid: [1, inf)"),
        ("--num_train_epochs", "-2", "num_train_epochs=-2.0 is out of range; valid: (0.0, inf)"),
        ("--report_to", "tensorbord", "report_to='tensorbord' is not a logging integration"),
    ]:
        assert run_cli(capsys, flag, value, "--output_dir", str(tmp_path)).startswith(expected)


def test_cli_resume_without_checkpoint(capsys, tmp_path):
    message = run_cli(capsys, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "true")
    assert message == (
        f"resume_from_checkpoint=true but '{tmp_path}' holds no checkpoint-* folder; give the path of a complete "
        "checkpoint or start without resume_from_checkpoint"
    )
    message = run_cli(capsys, "--output_dir", str(tmp_path), "--resume_from_checkpoint", str(tmp_path / "ckpt"))
    assert message.startswith(f"resume_from_checkpoint='{tmp_path / 'ckpt'}' is not a directory")


def test_cli_bad_sample_space_and_model_refused_before_training(capsys, tmp_path):
    message = run_cli(capsys, "--output_dir", str(tmp_path), "--sample_space", "0,1,1,1", "--max_steps", "1")
    assert message.startswith("sample_space=[0, 1, 1, 1] has 4 entries but the model has 3 residual stages")
    message = run_cli(
        capsys, "--output_dir", str(tmp_path), "--model_type", "mobilenet_v1",
        "--model_config", '{"depth_multiplier": 0.25, "image_size": 16}', "--max_steps", "1",
    )  # fmt: skip
    assert message.startswith("no residual stages found in MobileNetV1ForImageClassification")
    assert "register_stage_finder" in message
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "model.safetensors").exists()


def test_cli_missing_model_directory(capsys, tmp_path):
    message = run_cli(
        capsys, "--output_dir", str(tmp_path), "--model_type", "null", "--model_name_or_path", "./no_such_model"
    )
    assert message.startswith("model_name_or_path='./no_such_model' is not a directory")


def test_cli_null_on_a_field_that_needs_a_value(capsys):
    for argv in (["--image_size", "null"], ["--learning-rate=null"], ["--seed", "~"]):
        name = argv[0].removeprefix("--").split("=")[0].replace("-", "_")
        assert run_cli(capsys, *argv) == f"{name} cannot be unset (null): it needs a value; give one or leave it out"


def test_cli_train_takes_the_recipe_after_config_too(capsys, tmp_path):
    status = cli.main(
        ["train", "--config", QUICKSTART, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "true"]
    )
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("stim-hf: error: resume_from_checkpoint=true but"), err
    message = run_cli(capsys, "--config", QUICKSTART)
    assert message.startswith(f"more than one recipe given ({QUICKSTART}, {QUICKSTART}); give one")


def test_cli_train_help_names_the_command_and_the_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith("usage: stim-hf train RECIPE.yaml [--field value ...]\n")
    assert "stim-hf train --config RECIPE.yaml" in out


def test_train_script_reports_errors_as_stim_hf(tmp_path):
    script = REPO_ROOT / "scripts" / "train.py"
    result = subprocess.run(
        [sys.executable, str(script), QUICKSTART, "--num_subnet", "2"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("stim-hf: error: unknown command-line argument(s) ['--num_subnet']")


# -- models and checkpoints ---------------------------------------------------------------------------------


def test_pickled_model_weights_are_refused(tmp_path, tiny_cifar_resnet):
    folder = tmp_path / "pickled"
    tiny_cifar_resnet().config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"a pickle we will not open")
    with pytest.raises(ConfigError, match=r"has no model.safetensors \(it has pytorch_model.bin, a pickle"):
        check_model_source(ModelArguments(model_name_or_path=str(folder)))
    with pytest.raises(ConfigError, match="has no config.json"):
        check_model_source(ModelArguments(model_name_or_path=str(tmp_path)))
    check_model_source(ModelArguments(model_name_or_path="microsoft/resnet-50"))  # a hub name: from_pretrained's job


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("")
    args = training_args(resume_from_checkpoint="true")
    args.output_dir = str(tmp_path / "out")
    with pytest.raises(ConfigError, match="output_dir=.* is a file, not a directory"):
        resolve_resume_checkpoint(args)


def test_smaller_inputs_refused_for_a_model_that_cannot_take_them(tmp_path):
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(
        image_size=16, patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[1, 1], window_size=2, num_labels=3
    )
    model = SwinForImageClassification(config)
    with pytest.raises(ConfigError, match=r"min_input_scale=0.43: SwinForImageClassification \(hf_swin\) cannot run"):
        StimulativeTrainer(model=model, args=training_args(stim_method="stpp"))
    StimulativeTrainer(model=model, args=training_args(stim_method="stpp", min_input_scale=1.0))


def test_nothing_to_drop_is_refused(tiny_cifar_resnet):
    # depth 8 = one block per stage, and a stage keeps its first block: every sub-network is the full one.
    with pytest.raises(ConfigError, match=r"sample_space='full' lets sampling drop no block of .*\[0, 0, 0\]"):
        StimulativeTrainer(model=tiny_cifar_resnet(depth=8), args=training_args(stim_method="st"))
    with pytest.raises(ConfigError, match=r"sample_space=\[0, 0, 0\] lets sampling drop no block"):
        StimulativeTrainer(model=tiny_cifar_resnet(), args=training_args(stim_method="st", sample_space=[0, 0, 0]))
    # With smaller inputs (ST++) there is still something to train.
    StimulativeTrainer(model=tiny_cifar_resnet(depth=8), args=training_args(stim_method="stpp"))


# -- data -------------------------------------------------------------------------------------------------


def _image_bytes(mode: str, fmt: str = "PNG", size: int = 10) -> bytes:
    color = {"L": 128, "CMYK": (10, 20, 30, 40), "RGBA": (1, 2, 3, 4)}.get(mode, (200, 100, 50))
    buffer = io.BytesIO()
    Image.new(mode, (size, size), color).save(buffer, fmt)
    return buffer.getvalue()


def _parquet(path: Path, images: list[bytes], labels: list[int], **columns) -> str:
    features = {"image": datasets.Image(), "label": datasets.Value("int64")}
    data = {"image": [{"bytes": b, "path": None} for b in images], "label": labels}
    for name, values in columns.items():
        features[name] = datasets.Value("string")
        data[name] = values
    # batch_size given: datasets < 5 divides by zero estimating the size of an empty split otherwise.
    datasets.Dataset.from_dict(data, features=datasets.Features(features)).to_parquet(str(path), batch_size=100)
    return str(path)


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


def test_grayscale_cmyk_rgba_among_rgb_are_converted(tmp_path, cache_dir):
    images = [_image_bytes("RGB"), _image_bytes("L"), _image_bytes("CMYK", "JPEG"), _image_bytes("RGBA")] * 3
    train = _parquet(tmp_path / "mixed.parquet", images, [0, 1, 0, 1] * 3)
    args = DataArguments(train_file=train, validation_file=train, image_size=8, dataset_cache_dir=cache_dir)
    validation = load_image_datasets(args, seed=0)["validation"]
    batch = collate_image_batch(list(with_image_transforms(validation, args, train=False)))
    assert batch["pixel_values"].shape == (12, 3, 8, 8) and torch.isfinite(batch["pixel_values"]).all()


def test_missing_image_column_and_non_image_column(tmp_path, cache_dir):
    images = [_image_bytes("RGB")] * 4
    train = _parquet(tmp_path / "t.parquet", images, [0, 1, 0, 1], filename=["a.png", "b.png", "c.png", "d.png"])
    with pytest.raises(DataError) as info:
        load_image_datasets(DataArguments(train_file=train, image_column_name="img", dataset_cache_dir=cache_dir), 0)
    assert str(info.value) == (
        "image column 'img' not found in the training data (columns: image, label, filename); "
        "set image_column_name to one of them"
    )
    with pytest.raises(
        DataError, match=r"image column 'filename' of the training data holds Value\('string'.*not images"
    ):
        load_image_datasets(
            DataArguments(train_file=train, image_column_name="filename", dataset_cache_dir=cache_dir), 0
        )


def test_truncated_image_bytes_name_the_row(tmp_path, cache_dir):
    good = _image_bytes("RGB", "JPEG")
    train = _parquet(tmp_path / "t.parquet", [good, good, good[: len(good) // 3], good], [0, 1, 0, 1])
    args = DataArguments(train_file=train, validation_file=train, image_size=8, dataset_cache_dir=cache_dir)
    validation = with_image_transforms(load_image_datasets(args, seed=0)["validation"], args, train=False)
    assert validation[1]["pixel_values"].shape == (3, 8, 8)
    with pytest.raises(
        DataError, match=r"cannot decode the image of row 2 of its source split: .*replace or delete it"
    ):
        validation[2]


def test_empty_validation_file_and_missing_validation_file(tmp_path, cache_dir):
    train = _parquet(tmp_path / "t.parquet", [_image_bytes("RGB")] * 4, [0, 1, 0, 1])
    empty = _parquet(tmp_path / "e.parquet", [], [])
    with pytest.raises(DataError, match="the validation split is empty"):
        load_image_datasets(DataArguments(train_file=train, validation_file=empty, dataset_cache_dir=cache_dir), 0)
    with pytest.raises(DataError, match="validation_file '.*missing.parquet' does not exist"):
        DataArguments(train_file=train, validation_file=str(tmp_path / "missing.parquet"))


def test_negative_training_label(tmp_path, cache_dir):
    train = _parquet(tmp_path / "t.parquet", [_image_bytes("RGB")] * 4, [0, 1, -1, 1])
    with pytest.raises(DataError, match=r"label -1 in row 2 \(column 'label'\) is negative"):
        load_image_datasets(DataArguments(train_file=train, dataset_cache_dir=cache_dir), 0)


def test_labels_outside_the_model_head_are_caught_by_the_data_check(tmp_path, cache_dir):
    """Validation labels beyond the training classes never reach the loss (an index error there)."""
    train = _parquet(tmp_path / "t.parquet", [_image_bytes("RGB")] * 4, [0, 1, 0, 1])
    validation = _parquet(tmp_path / "v.parquet", [_image_bytes("RGB")] * 2, [1, 2])
    with pytest.raises(DataError, match=r"label 2 in row 1 of the validation data .* class ids 0..1"):
        load_image_datasets(DataArguments(train_file=train, validation_file=validation, dataset_cache_dir=cache_dir), 0)

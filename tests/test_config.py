"""Configuration: method presets, validation errors, YAML recipes with command-line overrides."""

import math

import pytest
import yaml

from stim_hf.data.image_datasets import DataArguments
from stim_hf.errors import ConfigError
from stim_hf.training.config import ModelArguments, StimulativeTrainingArguments
from stim_hf.training.parser import StimArgumentParser, load_recipe


def args(**kwargs):
    return StimulativeTrainingArguments(output_dir="unused", report_to="none", use_cpu=True, **kwargs)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("ct", dict(num_subnets=0, subnet_sampling="prefix", kl_loss="kl", min_input_scale=1.0)),
        ("st", dict(num_subnets=1, subnet_sampling="subset", kl_loss="kl", min_input_scale=1.0)),
        ("stpp", dict(num_subnets=1, subnet_sampling="prefix", kl_loss="kl_direction", min_input_scale=0.43)),
    ],
)
def test_presets(method, expected):
    a = args(stim_method=method)
    for name, value in expected.items():
        assert getattr(a, name) == value
    assert a.sample_space == "full"
    assert a.uses_subnets == (method != "ct")


def test_explicit_values_override_preset():
    a = args(stim_method="stpp", kl_loss="kl", min_input_scale=1.0, num_subnets=6, sample_space="0,1,3,0")
    assert (a.kl_loss, a.min_input_scale, a.num_subnets, a.sample_space) == ("kl", 1.0, 6, [0, 1, 3, 0])
    assert a.subnet_sampling == "prefix"


def test_hf_defaults_changed_for_image_training():
    a = args()
    assert a.remove_unused_columns is False
    assert a.ddp_find_unused_parameters is False
    assert a.logging_nan_inf_filter is False  # its check synchronises every step; the guard covers it


def test_batch_copies_are_non_blocking_from_pinned_memory_unless_set():
    def accelerator_config(**kwargs):
        return StimulativeTrainingArguments(output_dir="unused", report_to="none", **kwargs).accelerator_config

    assert accelerator_config(dataloader_pin_memory=True).non_blocking is True
    assert accelerator_config(dataloader_pin_memory=False).non_blocking is False
    assert args().accelerator_config.non_blocking is False  # use_cpu: the Trainer turns pinning off
    given = accelerator_config(accelerator_config={"non_blocking": False, "split_batches": True})
    assert given.non_blocking is False and given.split_batches is True
    other = accelerator_config(accelerator_config={"even_batches": False}, dataloader_pin_memory=True)
    assert other.non_blocking is True and other.even_batches is False


def test_pin_memory_follows_the_device_unless_set(monkeypatch):
    """Unset, batches are pinned when an accelerator trains; on a CPU torch would pin nothing and warn."""
    import stim_hf.training.config

    def pinned(**kwargs):
        made = StimulativeTrainingArguments(output_dir="unused", report_to="none", **kwargs)
        assert made.accelerator_config.non_blocking is made.dataloader_pin_memory
        return made.dataloader_pin_memory

    monkeypatch.setattr(stim_hf.training.config, "accelerator_available", lambda: False)
    assert pinned() is False and pinned(dataloader_pin_memory=True) is True
    monkeypatch.setattr(stim_hf.training.config, "accelerator_available", lambda: True)
    assert pinned() is True and pinned(dataloader_pin_memory=False) is False
    assert pinned(use_cpu=True) is False


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("stim_method", "stt", "stim_method='stt' is not a method; valid: ct, st, stpp"),
        ("kl_coef", -1.0, r"kl_coef=-1.0 is out of range; valid: \[0.0, inf\)"),
        ("kl_coef", math.nan, "kl_coef=nan must be a number"),
        (
            "kl_coef_schedule",
            "linear",
            "kl_coef_schedule='linear' is not valid; choose one of: constant, cosine_up",
        ),
        ("num_subnets", -1, r"num_subnets=-1 is out of range; valid: \[0, inf\)"),
        ("num_subnets", 1.5, "num_subnets=1.5 must be an integer"),
        ("kl_loss", "mse", "kl_loss='mse' is not valid; choose one of: kl, kl_direction"),
        ("kl_temperature", 0.0, r"kl_temperature=0.0 is out of range; valid: \(0.0, inf\)"),
        ("logit_amplitude", -2.0, "logit_amplitude=-2.0 is out of range"),
        ("logit_normalization", "batchnorm", "logit_normalization='batchnorm' is not valid"),
        ("subnet_sampling", "random", "subnet_sampling='random' is not valid; choose one of: prefix, subset"),
        ("sample_space", "1,-2", "sample_space='1,-2' is not valid"),
        ("sample_space", "most", "sample_space='most' is not valid"),
        ("min_input_scale", 0.0, r"min_input_scale=0.0 is out of range; valid: \(0.0, 1.0\]"),
        ("min_input_scale", 1.5, "min_input_scale=1.5 is out of range"),
        (
            "bn_policy",
            "freeze",
            "bn_policy='freeze' is not valid; choose one of: main_only, recalibrate, none",
        ),
        ("bn_recalibration_samples", 0, "bn_recalibration_samples=0 is out of range"),
        (
            "subnet_bn_recalibration_samples",
            -1,
            r"subnet_bn_recalibration_samples=-1 is out of range; valid: \[0, inf\)",
        ),
        ("subnet_bn_recalibration_samples", 2.5, "subnet_bn_recalibration_samples=2.5 must be an integer"),
        ("stim_start_epoch", -1.0, "stim_start_epoch=-1.0 is out of range"),
        ("num_eval_subnets", -3, "num_eval_subnets=-3 is out of range"),
        ("sync_batchnorm", "yes please", "sync_batchnorm='yes please' must be true or false"),
        ("channels_last", 2, "channels_last=2 must be true or false"),
        ("backward_strategy", "both", "backward_strategy='both' is not valid; choose one of: summed, sequential"),
    ],
)
def test_bad_values_name_field_value_and_range(field, value, message):
    with pytest.raises(ConfigError, match=message):
        args(**{field: value})


def test_find_unused_parameters_refused_where_it_breaks_ddp():
    """True breaks DDP's two forwards and one backward of the summed strategy (DESIGN.md 3)."""
    with pytest.raises(
        ConfigError, match="ddp_find_unused_parameters=true breaks DDP .* backward_strategy: sequential"
    ):
        args(ddp_find_unused_parameters=True)
    assert args(ddp_find_unused_parameters=True, backward_strategy="sequential").ddp_find_unused_parameters
    assert args(ddp_find_unused_parameters=True, stim_method="ct").ddp_find_unused_parameters


def test_model_arguments():
    assert ModelArguments(model_type="cifar_resnet", model_config='{"depth": 56}').model_config == {"depth": 56}
    with pytest.raises(ConfigError, match="exactly one of model_name_or_path"):
        ModelArguments()
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelArguments(model_type="cifar_resnet", model_config="{depth: 56")


def parser():
    return StimArgumentParser((ModelArguments, StimulativeTrainingArguments))


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_cli_overrides(tmp_path):
    recipe = write(
        tmp_path,
        "model_type: cifar_resnet\nmodel_config: {depth: 32}\nstim_method: st\nkl_coef: 2\nlearning_rate: 1e-4\n"
        "sample_space: [0, 1, 2]\nnormalize_main_logits: true\nreport_to: none\nuse_cpu: true\n"
        f"output_dir: {tmp_path / 'o'}\n",
    )
    model_args, train_args = parser().parse_args_and_config([recipe, "--kl_coef", "0.5", "--num_subnets", "3"])
    assert model_args.model_config == {"depth": 32}
    assert train_args.stim_method == "st" and train_args.subnet_sampling == "subset"
    assert train_args.kl_coef == 0.5 and train_args.num_subnets == 3
    assert train_args.learning_rate == 1e-4
    assert train_args.sample_space == [0, 1, 2]
    assert train_args.normalize_main_logits is True


def test_cli_null_unsets_a_recipe_value(tmp_path):
    recipe = write(tmp_path, f"model_name_or_path: some/model\noutput_dir: {tmp_path}\nuse_cpu: true\n")
    model_args, _ = parser().parse_args_and_config([recipe, "--model_name_or_path", "null", "--model_type", "resnet"])
    assert model_args.model_name_or_path is None and model_args.model_type == "resnet"


def test_unknown_yaml_key_is_an_error_with_suggestion(tmp_path):
    recipe = write(tmp_path, "model_type: cifar_resnet\nkl_coeff: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['kl_coeff'\].*did you mean: 'kl_coeff' -> 'kl_coef'"):
        parser().parse_args_and_config([recipe])


def test_unknown_cli_flag_is_an_error(tmp_path):
    recipe = write(tmp_path, f"model_type: cifar_resnet\noutput_dir: {tmp_path}\nuse_cpu: true\n")
    with pytest.raises(ConfigError, match=r"unknown command-line argument\(s\) \['--num_subnet'\]"):
        parser().parse_args_and_config([recipe, "--num_subnet", "2"])


def test_missing_or_broken_recipe(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parser().parse_args_and_config([str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parser().parse_args_and_config([write(tmp_path, "a: [1, 2\n")])
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parser().parse_args_and_config([write(tmp_path, "- 1\n- 2\n")])


def test_bad_value_in_recipe_reports_our_error(tmp_path):
    recipe = write(tmp_path, f"model_type: cifar_resnet\nbn_policy: freeze\noutput_dir: {tmp_path}\nuse_cpu: true\n")
    with pytest.raises(ConfigError, match="bn_policy='freeze'"):
        parser().parse_args_and_config([recipe])


def full_parser():
    return StimArgumentParser((ModelArguments, DataArguments, StimulativeTrainingArguments))


def data_recipe(tmp_path, extra=""):
    return write(
        tmp_path,
        f"model_type: cifar_resnet\ndataset_name: sklearn:digits\noutput_dir: {tmp_path}\nuse_cpu: true\n{extra}",
    )


@pytest.mark.parametrize(
    "null_args",
    [
        ["--max_train_samples", "null"],
        ["--max-train-samples", "null"],
        ["--max_train_samples=null"],
        ["--max-train-samples=null"],
        ["--max_train_samples", "~"],
    ],
)
def test_every_spelling_of_null_unsets_a_recipe_value(tmp_path, null_args):
    recipe = data_recipe(tmp_path, "max_train_samples: 100\n")
    _, data_args, _ = full_parser().parse_args_and_config([recipe, *null_args])
    assert data_args.max_train_samples is None


def test_none_stays_a_value_and_null_and_a_value_for_one_field_is_an_error(tmp_path):
    _, data_args, _ = full_parser().parse_args_and_config([data_recipe(tmp_path), "--dataset_name", "none"])
    assert data_args.dataset_name == "none"
    with pytest.raises(ConfigError, match="dataset_name is given both null and a value on the command line"):
        full_parser().parse_args_and_config([data_recipe(tmp_path), "--dataset_name", "null", "--dataset-name=x"])


@pytest.mark.parametrize(
    "field", ["image_size", "image-size", "learning_rate", "num_train_epochs", "seed", "train_val_split", "use_cpu"]
)
def test_null_on_a_field_that_needs_a_value_is_an_error(tmp_path, field):
    name = field.replace("-", "_")
    message = f"^{name} cannot be unset \\(null\\): it needs a value; give one or leave it out$"
    with pytest.raises(ConfigError, match=message):
        full_parser().parse_args_and_config([data_recipe(tmp_path), f"--{field}", "null"])
    with pytest.raises(ConfigError, match=message):
        full_parser().parse_args_and_config([data_recipe(tmp_path), f"--{field}=null"])


def test_null_in_the_recipe_on_a_field_that_needs_a_value_is_an_error(tmp_path):
    recipe = data_recipe(tmp_path, "image_size: ~\n")
    with pytest.raises(ConfigError, match=f"image_size cannot be unset \\(null\\) in '{recipe}': it needs a value"):
        full_parser().parse_args_and_config([recipe])


def test_config_flag_is_the_recipe(tmp_path):
    recipe = data_recipe(tmp_path, "kl_coef: 0.25\n")
    for argv in (["--config", recipe], [f"--config={recipe}"], ["--kl_coef", "0.5", "--config", recipe]):
        model_args, data_args, train_args = full_parser().parse_args_and_config(argv)
        assert model_args.model_type == "cifar_resnet" and data_args.dataset_name == "sklearn:digits"
        assert train_args.kl_coef == (0.5 if "--kl_coef" in argv else 0.25)


@pytest.mark.parametrize(
    "argv",
    [["RECIPE", "--config", "RECIPE"], ["--config", "RECIPE", "--config=RECIPE"]],
)
def test_two_recipes_are_an_error(tmp_path, argv):
    recipe = data_recipe(tmp_path)
    with pytest.raises(ConfigError, match="more than one recipe given .*; give one, either first"):
        full_parser().parse_args_and_config([recipe if a == "RECIPE" else a.replace("RECIPE", recipe) for a in argv])
    with pytest.raises(ConfigError, match="--config needs the path of a YAML recipe"):
        full_parser().parse_args_and_config(["--config"])


def test_duplicate_recipe_key_names_the_key_and_both_lines(tmp_path):
    recipe = write(tmp_path, "model_type: cifar_resnet\nseed: 1\nuse_cpu: true\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"sets 'seed' twice \(lines 2 and 4\); keep one of them"):
        parser().parse_args_and_config([recipe])
    nested = write(tmp_path, "model_type: cifar_resnet\nmodel_config:\n  depth: 20\n  depth: 32\n")
    with pytest.raises(ConfigError, match=r"sets 'depth' twice \(lines 3 and 4\)"):
        load_recipe(nested)


def test_recipe_yaml_otherwise_reads_as_safe_load(tmp_path):
    text = "base: &base {a: 1, b: 2}\nmerged:\n  <<: *base\n  b: 3\nlr: 1e-4\nwd: 5.0e-4\nflag: yes\nnothing: ~\n"
    assert load_recipe(write(tmp_path, text)) == yaml.safe_load(text)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(write(tmp_path, "a: !!python/object:os.system {}\n"))


def test_unknown_flag_is_reported_before_the_dataclasses_validate(tmp_path):
    # Without a recipe ModelArguments alone would refuse (no model_type); the typo must be named first.
    with pytest.raises(ConfigError, match=r"unknown command-line argument\(s\) \['--num_subnet'\].*'--num_subnets'"):
        parser().parse_args_and_config(["--num_subnet", "2"])
    with pytest.raises(ConfigError, match=r"\['--num-subnet=2'\] \(did you mean: '--num-subnet=2' -> '--num_subnets'"):
        full_parser().parse_args_and_config([data_recipe(tmp_path), "--bn_policy", "freeze", "--num-subnet=2"])


def test_help_names_the_command_and_the_recipe():
    usage = full_parser().format_usage()
    assert usage.startswith("usage: stim-hf train RECIPE.yaml [--field value ...]\n")
    assert "stim-hf train --config RECIPE.yaml [--field value ...]" in usage
    assert "--field null unsets a value the recipe set" in " ".join(full_parser().format_help().split())


def test_a_value_transformers_refuses_is_one_config_error_line():
    # TrainingArguments' own check (a ValueError from its __post_init__) comes out as our one-line error.
    with pytest.raises(ConfigError, match=r"load_best_model_at_end requires the save and eval strategy to match.*"
                                          r"\(a TrainingArguments setting, from the recipe or the command line\)$"):  # fmt: skip
        StimulativeTrainingArguments(
            output_dir="unused", report_to="none", use_cpu=True, load_best_model_at_end=True,
            eval_strategy="epoch", save_strategy="steps", save_steps=5,
        )  # fmt: skip

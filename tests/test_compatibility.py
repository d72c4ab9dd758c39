"""What the trainers take from ``transformers.Trainer`` still fits the installed transformers (docs/compatibility.md).

The overrides are read from the docs' table, so the table, the code and the installed Trainer are
compared with each other: a method we override that the Trainer renamed, dropped or called with
other arguments fails here, by name, instead of being silently never called (or called wrongly).
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import transformers
from conftest import REPO_ROOT, make_tensor_dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments
from stim_hf.training.reliable_trainer import ReliableTrainer

COMPATIBILITY_DOC = REPO_ROOT / "docs" / "compatibility.md"
OUR_TRAINERS = (ReliableTrainer, StimulativeTrainer)


def documented_overrides() -> dict[str, set[str]]:
    """``{method: {our classes}}`` from the table under "## Trainer methods we override"."""
    section = COMPATIBILITY_DOC.read_text().split("## Trainer methods we override", 1)[1].split("\n#", 1)[0]
    overrides = {}
    for row in re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, flags=re.MULTILINE):
        overrides[row[0]] = {name.strip() for name in row[1].split(",")}
    return overrides


def overrides_in_code() -> dict[str, set[str]]:
    """``{method: {our classes}}`` for every attribute our trainers define that ``Trainer`` has too."""
    found: dict[str, set[str]] = {}
    for cls in OUR_TRAINERS:
        for name in vars(cls):
            if not name.startswith("__") and hasattr(Trainer, name):
                found.setdefault(name, set()).add(cls.__name__)
    return found


def signature_problem(override, parent) -> str | None:
    """Why ``override`` cannot take every call ``parent`` takes (None: it can).

    Each parameter of the parent must be there with the same name, kind and default (or be taken by
    ``*args`` / ``**kwargs``); a parameter the parent lacks must have a default.
    """
    ours, theirs = inspect.signature(override), inspect.signature(parent)
    mine = dict(ours.parameters)
    var_positional = any(p.kind is p.VAR_POSITIONAL for p in mine.values())
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in mine.values())
    positional = [p for p in mine.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for index, (name, param) in enumerate(
        (name, param) for name, param in theirs.parameters.items() if param.kind not in (param.VAR_POSITIONAL,)
    ):
        if param.kind is param.VAR_KEYWORD:
            if not var_keyword:
                return "the Trainer's takes **kwargs and ours does not"
            continue
        if name not in mine:
            by_position = param.kind is not param.KEYWORD_ONLY and var_positional
            by_keyword = param.kind is not param.POSITIONAL_ONLY and var_keyword
            if not (by_position or by_keyword):
                return f"parameter '{name}' is missing"
            continue
        own = mine.pop(name)
        if param.kind is not param.KEYWORD_ONLY and (index >= len(positional) or positional[index].name != name):
            return f"parameter '{name}' is not at position {index}"
        if own.kind is own.KEYWORD_ONLY and param.kind is not param.KEYWORD_ONLY:
            return f"parameter '{name}' is keyword-only in ours"
        if param.default is not param.empty and own.default != param.default:
            return f"parameter '{name}' defaults to {own.default!r} in ours and {param.default!r} in the Trainer's"
    extra = [n for n, p in mine.items() if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if extra:
        return f"ours requires parameters the Trainer never passes: {extra}"
    return None


def test_the_documented_overrides_are_the_overrides_in_the_code():
    documented, found = documented_overrides(), overrides_in_code()
    assert documented, f"no table of overrides found in {COMPATIBILITY_DOC}"
    gone = sorted(set(documented) - set(found))
    assert not gone, (
        f"transformers {transformers.__version__}: Trainer has no {gone} any more (or we stopped overriding them); "
        "an override of a method the Trainer no longer calls silently does nothing"
    )
    assert found == documented, f"docs/compatibility.md lists {documented}, the code overrides {found}"


@pytest.mark.parametrize("name", sorted(overrides_in_code()))
def test_each_override_takes_the_calls_the_trainer_makes(name):
    parent = inspect.getattr_static(Trainer, name)
    for cls in OUR_TRAINERS:
        if name not in vars(cls):
            continue
        ours = vars(cls)[name]
        where = f"{cls.__name__}.{name} against transformers {transformers.__version__}'s Trainer.{name}"
        assert isinstance(ours, staticmethod) == isinstance(parent, staticmethod), f"{where}: static in one only"
        if callable(parent) or isinstance(parent, staticmethod):
            problem = signature_problem(getattr(cls, name), getattr(Trainer, name))
            assert problem is None, (
                f"{where}: {problem}\n  ours:    {inspect.signature(getattr(cls, name))}"
                f"\n  Trainer: {inspect.signature(getattr(Trainer, name))}"
            )


def test_signature_problem_names_what_differs():
    def parent(self, model, trial=None): ...

    def same(self, model, trial=None): ...

    def swallowed(self, *args, **kwargs): ...

    def renamed(self, module, trial=None): ...

    def reordered(self, trial, model): ...

    def new_default(self, model, trial=0): ...

    def extra_required(self, model, trial=None, scale=None, *, step): ...

    assert signature_problem(same, parent) is None and signature_problem(swallowed, parent) is None
    assert signature_problem(renamed, parent) == "parameter 'model' is missing"
    assert signature_problem(reordered, parent) == "parameter 'model' is not at position 1"
    assert "defaults to 0 in ours" in signature_problem(new_default, parent)
    assert signature_problem(extra_required, parent) == "ours requires parameters the Trainer never passes: ['step']"


def test_set_initial_training_values_has_the_layout_the_trainer_reads():
    """``StimulativeTrainer`` reads positions 1 (update steps per epoch) and 6 (max steps) of the tuple.

    40 samples, batch 4, accumulation 2, 3 epochs: every position holds a different number, so a
    reordered tuple cannot pass.
    """
    args = TrainingArguments(
        output_dir="unused", per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=3,
        use_cpu=True, report_to="none",
    )  # fmt: skip
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
    loader = torch.utils.data.DataLoader(list(range(40)), batch_size=4)
    values = Trainer.set_initial_training_values(trainer, args, loader)
    # num_train_epochs, num_update_steps_per_epoch, num_examples, num_train_samples, total_train_batch_size,
    # steps_in_epoch, max_steps
    assert tuple(values) == (3, 5, 40, 120, 8, 10, 15), (
        f"transformers {transformers.__version__}: Trainer.set_initial_training_values returned {values}; "
        "StimulativeTrainer.set_initial_training_values reads [1] as the update steps per epoch and [6] as max_steps"
    )


def test_the_trainer_state_we_read_is_where_we_read_it(tmp_path, tiny_cifar_resnet):
    """Private ``Trainer`` attributes the trainers read (a rename would silently turn a feature off)."""
    seen = {}

    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen["tr_loss"] = getattr(trainer, "_tr_loss", None)
            seen["last_logged"] = getattr(trainer, "_globalstep_last_logged", None)
            seen["accumulation"] = getattr(trainer, "current_gradient_accumulation_steps", None)
            seen["learning_rate"] = trainer._get_learning_rate()

    args = StimulativeTrainingArguments(
        output_dir=str(tmp_path), stim_method="ct", per_device_train_batch_size=8, max_steps=2, use_cpu=True,
        report_to="none", save_strategy="no", num_eval_subnets=0, disable_tqdm=True, learning_rate=0.05,
        lr_scheduler_type="constant",
    )  # fmt: skip
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=make_tensor_dataset(16))
    trainer.add_callback(Look())
    trainer.train()
    version = f"transformers {transformers.__version__}"
    assert isinstance(seen["tr_loss"], torch.Tensor), f"{version}: Trainer._tr_loss (the loss being accumulated)"
    assert isinstance(seen["last_logged"], int), f"{version}: Trainer._globalstep_last_logged"
    assert seen["accumulation"] == 1, f"{version}: Trainer.current_gradient_accumulation_steps"
    assert seen["learning_rate"] > 0, f"{version}: Trainer._get_learning_rate()"
    assert "loss_is_scaled_for_ga" in vars(Trainer), f"{version}: the class attribute Trainer.loss_is_scaled_for_ga"
    assert hasattr(trainer, "is_distributed_loading_by_transformers"), f"{version}: is_distributed_loading_by_..."
    assert callable(getattr(Trainer, "_has_mixed_mesh_grads", None)), f"{version}: Trainer._has_mixed_mesh_grads()"
    assert trainer.model_accepts_loss_kwargs is False

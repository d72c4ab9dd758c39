"""NaN / inf losses: stop with a message naming the step and the term (and a dump), or skip the update."""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import pytest
import torch
from conftest import make_tensor_dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments
from stim_hf.training.reliable_trainer import NonFiniteLossError

make_dataset = functools.partial(make_tensor_dataset, n=16)


def make_args(tmp_path, **kwargs) -> StimulativeTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        learning_rate=0.05,
        optim="sgd",
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=1,
        use_cpu=True,
        disable_tqdm=True,
        stim_method="stpp",
    )
    return StimulativeTrainingArguments(**(defaults | kwargs))


def test_inf_input_stops_naming_step_and_ce_and_saves_a_dump(tmp_path, tiny_cifar_resnet):
    model = tiny_cifar_resnet()
    weights_before = {k: v.detach().clone() for k, v in model.named_parameters()}  # BN buffers move in a forward
    data = make_dataset(poisoned=3)
    trainer = StimulativeTrainer(model=model, args=make_args(tmp_path), train_dataset=data)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    assert "zero_grad" not in vars(trainer.model)  # the step's one-shot zero_grad does not outlive the run
    message = str(info.value)
    assert message.startswith(
        "non-finite loss at training step 1 (epoch 0.00): the full network's cross-entropy (ce_loss) is nan"
    )
    dump = tmp_path / "out" / "nonfinite-step-1"
    assert f"'{dump}'" in message and "on_nonfinite_loss: skip" in message
    # Stopped before the optimizer step: the dumped weights are those that produced the NaN.
    dumped = load_file(dump / "model.safetensors")
    for name, value in weights_before.items():
        assert torch.equal(dumped[name], value), name
    assert torch.equal(
        load_file(dump / "batch.safetensors")["labels_micro_batch_0"].sort().values, data[:]["labels"].sort().values
    )
    report = json.loads((dump / "report.json").read_text())
    assert report["global_step"] == 1 and report["terms"][0]["term"] == "ce_loss"
    assert report["terms"][1]["subnet"]["depths"] and report["terms"][1]["term"] == "kl_loss_0"
    assert (dump / "config.json").is_file() and not (dump / "training_args.bin").exists()


def test_kl_term_is_named_with_its_subnetwork(tmp_path, tiny_cifar_resnet):
    args = make_args(tmp_path, num_subnets=3, max_steps=3)
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=make_dataset())
    culprit = trainer.subnet_sampler.sample(step=1, micro_step=0, index=2, image_size=16)
    original = trainer.subnet_kl

    def overflowing_kl(model, pixel_values, teacher_logits, subnet):
        kl = original(model, pixel_values, teacher_logits, subnet)
        return kl * float("inf") if trainer.state.global_step == 1 and subnet == culprit else kl

    trainer.subnet_kl = overflowing_kl
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    assert "zero_grad" not in vars(trainer.model)  # the step's one-shot zero_grad does not outlive the run
    message = str(info.value)
    assert message.startswith(
        f"non-finite loss at training step 2 (epoch 1.00): the KL loss of sub-network 2 ({culprit.describe()}) "
        "is inf in micro-batch 0; training stopped before the update"
    )
    assert "size=" in culprit.describe() and "ce_loss" not in message


class RecordSteps(TrainerCallback):
    """Parameters and SGD momentum buffers after every optimizer step."""

    def __init__(self):
        self.params, self.momentum, self.lrs = [], [], []

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self.params.append({k: v.detach().clone() for k, v in model.named_parameters()})
        self.momentum.append([s["momentum_buffer"].clone() for s in optimizer.state.values() if "momentum_buffer" in s])
        self.lrs.append(lr_scheduler.get_last_lr()[0])


def test_skip_leaves_parameters_and_optimizer_state_untouched(tmp_path, tiny_cifar_resnet, caplog):
    """Gradient accumulation 2: an inf loss in the 2nd micro-batch of step 2 skips step 2's whole update."""
    args = make_args(
        tmp_path,
        on_nonfinite_loss="skip",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=3,
        optim_args="momentum=0.9",
        weight_decay=0.01,  # a zero gradient would still move the weights: a real skip does not
        lr_scheduler_type="linear",
    )
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=make_dataset(n=48))
    original = trainer.main_loss

    def exploding_ce(logits, labels):
        ce = original(logits, labels)
        # Called once the micro-batch counter has moved (the full network's input size is drawn from it): (1, 2)
        # means "2nd micro-batch of step 2".
        return ce * float("inf") if trainer.model.training and trainer._micro_step_key == (1, 2) else ce

    trainer.main_loss = exploding_ce
    recorder = RecordSteps()
    trainer.add_callback(recorder)
    with caplog.at_level(logging.WARNING, logger="stim_hf"):
        trainer.train()
    assert trainer.state.global_step == 3
    before, skipped, after = recorder.params
    assert all(torch.equal(before[k], skipped[k]) for k in before)
    assert not all(torch.equal(skipped[k], after[k]) for k in before)
    assert all(torch.equal(a, b) for a, b in zip(recorder.momentum[0], recorder.momentum[1], strict=True))
    assert recorder.lrs[0] > recorder.lrs[1] > recorder.lrs[2]  # the schedule goes on
    assert (
        "non-finite loss at training step 2 (epoch 0.33): the full network's cross-entropy (ce_loss) is inf in "
        "micro-batch 1; skipped this step's update (on_nonfinite_loss=skip, 1 skipped so far)"
    ) in caplog.text
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry.get("nonfinite_skipped_steps", 0) for entry in logs] == [0, 1.0, 1.0]
    assert all(np.isfinite(entry["ce_loss"]) for entry in logs if "ce_loss" in entry)
    assert "ce_loss" not in logs[1]  # the skipped step's terms are left out of the logged means
    # logging_nan_inf_filter is off (its check syncs every step): the skipped step counts at the
    # interval's mean so far, which is 0 on an interval of its own, as the Trainer's filter does.
    assert not args.logging_nan_inf_filter
    assert logs[1]["loss"] == 0.0 and np.isfinite(logs[2]["loss"]) and logs[2]["loss"] > 0
    assert not (tmp_path / "out" / "nonfinite-step-2").exists()


def test_skip_stops_a_run_that_has_diverged(tmp_path, tiny_cifar_resnet):
    """Every step non-finite: skip drops 19 updates, then stops at the 20th in a row with the dump."""
    from stim_hf.training.reliable_trainer import MAX_CONSECUTIVE_SKIPPED_STEPS

    args = make_args(tmp_path, on_nonfinite_loss="skip", per_device_train_batch_size=4, max_steps=30)
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=make_dataset())
    original = trainer.main_loss
    trainer.main_loss = lambda logits, labels: original(logits, labels) * float("nan")
    with pytest.raises(NonFiniteLossError, match=r"that is 20 non-finite steps in a row, so the run has diverged"):
        trainer.train()
    assert MAX_CONSECUTIVE_SKIPPED_STEPS == 20
    assert trainer.nonfinite_skipped_steps == 19 and trainer.state.global_step == 19
    assert (tmp_path / "out" / "nonfinite-step-20").is_dir()

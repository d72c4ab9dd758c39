"""The stimulative Trainer: loss, gradient accumulation, BatchNorm policies, sampling sequence, logging."""

import copy
import time
import warnings

import numpy as np
import pytest
import torch
from conftest import make_tensor_dataset
from transformers import Trainer, TrainingArguments

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments
from stim_hf.errors import ConfigError, ModelStructureError
from stim_hf.method.batchnorm import batchnorm_layers, recalibration_indices
from stim_hf.training.config import accelerator_available
from stim_hf.training.optimizers import with_fused_kernel

make_dataset = make_tensor_dataset


def make_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=123,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    defaults.update(kwargs)
    return StimulativeTrainingArguments(**defaults)


def plain_trainer_args(args, output_dir):
    """The plain Trainer's arguments matching ``args`` (the fields TrainingArguments has)."""
    return TrainingArguments(
        **{k: v for k, v in args.to_dict().items() if k in TrainingArguments.__dataclass_fields__}
        | {"output_dir": str(output_dir), "remove_unused_columns": False}
    )


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_ct_update_equals_plain_trainer_bit_for_bit(tmp_path, tiny_cifar_resnet, max_grad_norm):
    """CT through StimulativeTrainer is Trainer: same weights, same logged loss, grad norm and FLOPs.

    With and without clipping, since the trainer keeps its own (cheaper) gradient-norm and FLOP
    bookkeeping; a transformers release that stopped calling it would show here too.
    """
    data = make_dataset()
    model_a = tiny_cifar_resnet()
    model_b = copy.deepcopy(model_a)
    args = make_args(tmp_path, stim_method="ct", max_grad_norm=max_grad_norm)
    calls = {"grad_norm": 0, "flops": 0}

    class Counting(StimulativeTrainer):
        def _get_grad_norm(self, model, grad_norm=None):
            calls["grad_norm"] += 1
            return super()._get_grad_norm(model, grad_norm)

        def floating_point_ops(self, inputs):
            calls["flops"] += 1
            return super().floating_point_ops(inputs)

    stim = Counting(model=model_a, args=args, train_dataset=data)
    stim.train()
    plain_args = plain_trainer_args(args, tmp_path / "plain")
    plain = Trainer(model=model_b, args=plain_args, train_dataset=data)
    plain.train()
    a, b = params(model_a), params(model_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # And the models really moved.
    assert not torch.equal(a["classifier.weight"], params(tiny_cifar_resnet())["classifier.weight"])
    logged = [(h["loss"], h["grad_norm"]) for h in stim.state.log_history if "loss" in h]
    assert logged == [(h["loss"], h["grad_norm"]) for h in plain.state.log_history if "loss" in h]
    assert stim.state.total_flos == plain.state.total_flos > 0
    assert calls == {"grad_norm": 4, "flops": 4}
    # ...with torch's fused SGD kernel against the Trainer's per-tensor SGD (bit-identical on a CPU).
    assert stim.optimizer.optimizer.defaults["fused"] is True
    assert not plain.optimizer.optimizer.defaults["fused"]


def test_logged_grad_norm_is_unscaled_under_fp16_loss_scaling(tmp_path, tiny_cifar_resnet):
    """With fp16's GradScaler the gradients carry the loss scale; the logged norm must not (as the Trainer logs it).

    accelerate makes a GradScaler on GPUs only, so a CPU one stands in for it, in both trainers.
    """

    def with_loss_scaling(trainer):
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        trainer.accelerator.native_amp = True
        return trainer

    data = make_dataset()
    model_a = tiny_cifar_resnet()
    model_b = copy.deepcopy(model_a)
    args = make_args(tmp_path, stim_method="ct", max_grad_norm=0.0, fp16=True)
    stim = with_loss_scaling(StimulativeTrainer(model=model_a, args=args, train_dataset=data))
    stim.train()
    plain_args = plain_trainer_args(args, tmp_path / "plain")
    plain = with_loss_scaling(Trainer(model=model_b, args=plain_args, train_dataset=data))
    plain.train()
    norms = [h["grad_norm"] for h in stim.state.log_history if "loss" in h]
    assert norms == [h["grad_norm"] for h in plain.state.log_history if "loss" in h]
    assert all(0 < norm < 100 for norm in norms), norms  # a 1024x scaled norm would read in the thousands
    a, b = params(model_a), params(model_b)
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize(
    ("optim", "optim_args", "fused_optimizer", "fused"),
    [
        ("sgd", "momentum=0.9,nesterov=true", True, True),
        ("adamw_torch", None, True, True),
        ("sgd", "momentum=0.9,nesterov=true", False, None),
        ("adagrad", None, True, None),  # torch's fused Adagrad is CPU-only: left as the Trainer builds it
    ],
)
def test_fused_optimizer_gives_the_trainers_optimizer_torchs_fused_kernel(
    tmp_path, tiny_cifar_resnet, optim, optim_args, fused_optimizer, fused
):
    args = make_args(tmp_path, optim=optim, optim_args=optim_args, fused_optimizer=fused_optimizer, max_steps=2)
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=make_dataset())
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert optimizer.defaults.get("fused") is fused
    if optim == "sgd":  # the recipe's settings survive
        assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"] is True
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]  # the Trainer's groups, unchanged
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(trainer.model.parameters()))


def test_fused_kernel_is_not_forced_where_torch_has_none():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert with_fused_kernel(torch.optim.SGD, {"lr": 0.1}, params) == {"lr": 0.1, "fused": True}
    assert with_fused_kernel(torch.optim.SGD, {"lr": 0.1, "foreach": True}, params) == {"lr": 0.1, "foreach": True}
    assert with_fused_kernel(torch.optim.RMSprop, {"lr": 0.1}, params) == {"lr": 0.1}
    meta = [torch.nn.Parameter(torch.zeros(2, device="meta"))]
    assert with_fused_kernel(torch.optim.SGD, {"lr": 0.1}, meta) == {"lr": 0.1}


def test_stpp_step_differs_from_ct(tmp_path, tiny_cifar_resnet):
    data = make_dataset()
    models = {}
    for method in ("ct", "stpp"):
        model = tiny_cifar_resnet()
        StimulativeTrainer(
            model=model, args=make_args(tmp_path, stim_method=method, max_steps=1), train_dataset=data
        ).train()
        models[method] = params(model)
    assert not torch.equal(
        models["ct"]["resnet.stages.2.layers.0.conv1.weight"],
        models["stpp"]["resnet.stages.2.layers.0.conv1.weight"],
    )


def _first_log(trainer):
    return next(entry for entry in trainer.state.log_history if "loss" in entry)


@pytest.mark.parametrize("stim_method", ["ct", "stpp"])
def test_gradient_accumulation_does_not_inflate_loss(tmp_path, tiny_cifar_resnet, stim_method):
    data = make_dataset(n=64)
    logs = {}
    for ga, batch in ((1, 32), (4, 8)):
        model = tiny_cifar_resnet()
        args = make_args(
            tmp_path,
            stim_method=stim_method,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=ga,
            max_steps=1,
        )
        trainer = StimulativeTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        logs[ga] = _first_log(trainer)
    # Same data, same weights: only BN batch statistics (8 vs 32 images) differ. Inflation would be 4x.
    for key in ("loss", "ce_loss"):
        ratio = logs[4][key] / logs[1][key]
        assert 0.85 < ratio < 1.15, (key, logs)
    assert logs[4]["ce_loss"] == pytest.approx(logs[4]["loss"] - logs[4]["kl_coef"] * logs[4]["kl_loss"], rel=1e-4)


def test_logged_stimulative_scalars(tmp_path, tiny_cifar_resnet):
    args = make_args(tmp_path, stim_method="stpp", num_subnets=2, min_input_scale=0.5, logging_steps=2)
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=make_dataset())
    trainer.train()
    log = _first_log(trainer)
    assert log["kl_coef"] == 1.0
    assert log["kl_loss"] > 0
    assert 0 < log["subnet_depth_fraction"] <= 1
    assert 8 <= log["subnet_input_size"] <= 16
    # loss = CE + lambda * sum over K=2 sub-networks; kl_loss is the mean per sub-network.
    assert log["loss"] == pytest.approx(log["ce_loss"] + 2 * log["kl_loss"], rel=1e-4)


def test_kl_coef_schedule_and_start_epoch(tmp_path, tiny_cifar_resnet):
    args = make_args(
        tmp_path,
        stim_method="st",
        kl_coef=2.0,
        kl_coef_schedule="cosine_up",
        max_steps=-1,
        num_train_epochs=4,
        stim_start_epoch=2,
    )
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=make_dataset(n=32))
    trainer.train()
    coefs = [entry["kl_coef"] for entry in trainer.state.log_history if "kl_coef" in entry]
    kls = [entry["kl_loss"] for entry in trainer.state.log_history if "kl_coef" in entry]
    assert len(coefs) == 8
    assert coefs[:4] == [0.0] * 4 and kls[:4] == [0.0] * 4  # epochs 0-1: common training only
    assert coefs[4:] == sorted(coefs[4:]) and coefs[-1] <= 2.0 and coefs[-1] > 1.0


def test_kl_coef_schedule_ends_at_max_steps(tmp_path, tiny_cifar_resnet):
    """With ``max_steps`` (here 1.5 epochs of 4 steps), the schedule runs over those 6 steps.

    The Trainer rounds its epoch count up to 2; measured against that, cosine_down stopped at 0.31.
    """
    from stim_hf.training.trainer import kl_coef_at

    args = make_args(tmp_path, stim_method="st", kl_coef_schedule="cosine_down", max_steps=6)
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=make_dataset(n=64))
    trainer.train()
    coefs = [entry["kl_coef"] for entry in trainer.state.log_history if "kl_coef" in entry]
    assert coefs == pytest.approx([kl_coef_at(1.0, "cosine_down", step / 6) for step in range(6)])
    assert coefs[-1] < 0.07


def test_a_stim_start_epoch_after_the_run_is_named_in_a_warning(tmp_path, tiny_cifar_resnet, caplog):
    args = make_args(tmp_path, stim_start_epoch=100, max_steps=6)
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=make_dataset(n=64))
    with caplog.at_level("WARNING", logger="stim_hf.training.trainer"):
        trainer.train()
    assert "stim_start_epoch=100 is at or after the end of training (1.5 epochs)" in caplog.text


def _record_samples(trainer):
    seen = []
    original = trainer.subnet_sampler.sample

    def recording(*args, **kwargs):
        subnet = original(*args, **kwargs)
        seen.append(subnet)
        return subnet

    trainer.subnet_sampler.sample = recording
    return seen


def test_same_seed_same_subnet_sequence(tmp_path, tiny_cifar_resnet):
    sequences = []
    for seed in (5, 5, 6):
        args = make_args(
            tmp_path, stim_method="stpp", num_subnets=2, seed=seed, gradient_accumulation_steps=2, max_steps=3
        )
        trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=make_dataset())
        seen = _record_samples(trainer)
        trainer.train()
        sequences.append(seen)
    assert len(sequences[0]) == 3 * 2 * 2
    assert sequences[0] == sequences[1]
    assert sequences[0] != sequences[2]


def test_main_only_leaves_running_stats_as_ct(tmp_path, tiny_cifar_resnet):
    data = make_dataset()
    stats = {}
    for name, kwargs in {
        "ct": dict(stim_method="ct"),
        "main_only": dict(stim_method="stpp", num_subnets=3, bn_policy="main_only"),
        "none": dict(stim_method="stpp", num_subnets=3, bn_policy="none"),
    }.items():
        model = tiny_cifar_resnet()
        StimulativeTrainer(model=model, args=make_args(tmp_path, max_steps=1, **kwargs), train_dataset=data).train()
        stats[name] = {k: v for k, v in params(model).items() if "running" in k or "num_batches" in k}
    for key in stats["ct"]:
        assert torch.equal(stats["ct"][key], stats["main_only"][key]), key
    assert any(not torch.equal(stats["ct"][k], stats["none"][k]) for k in stats["ct"])


def test_recalibrate_sets_full_network_statistics(tmp_path, tiny_cifar_resnet):
    data = make_dataset(n=48)
    args = make_args(
        tmp_path,
        stim_method="stpp",
        num_subnets=2,
        bn_policy="recalibrate",
        bn_recalibration_samples=48,
        per_device_train_batch_size=48,
        max_steps=2,
    )
    model = tiny_cifar_resnet()
    trainer = StimulativeTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    trainer.evaluate()
    assert trainer._bn_recalibrated_at == trainer.state.global_step
    recalibrated = {k: v for k, v in params(model).items() if "running" in k}

    # By hand: the full network's batch statistics over all 48 images, in one batch.
    reference = copy.deepcopy(model).train()
    for layer in batchnorm_layers(reference):
        layer.reset_running_stats()
        layer.momentum = None
    with torch.no_grad():
        reference(pixel_values=data[:]["pixel_values"])
    for key, value in recalibrated.items():
        torch.testing.assert_close(value, reference.state_dict()[key], rtol=1e-4, atol=1e-5)
    assert model.training is False or model.training is True  # mode is restored below
    # Evaluation mode and weights are untouched by recalibration.
    assert all(torch.isfinite(v).all() for v in recalibrated.values())


@pytest.mark.parametrize("num_samples, world_size", [(2000, 3), (2000, 1), (7, 2), (5, 8)])
def test_recalibration_gives_every_process_as_many_images(num_samples, world_size):
    """Unequal shares (667, 667, 666 of 2,000 on 3 processes) hang SyncBatchNorm at batch 18."""
    order = np.random.default_rng(0).permutation(5000)
    shards = [recalibration_indices(5000, num_samples, 0, rank, world_size) for rank in range(world_size)]
    assert len({len(shard) for shard in shards}) == 1
    used = sorted(i for shard in shards for i in shard)
    assert len(used) == len(set(used)) == num_samples - num_samples % world_size
    assert set(used) <= set(order[:num_samples].tolist())
    assert sorted(recalibration_indices(5, 100, seed=0)) == list(range(5))  # a smaller data set: every image


def test_recalibration_keeps_training_random_stream(tmp_path, tiny_cifar_resnet):
    data = make_dataset(n=32)
    results = []
    for policy in ("main_only", "recalibrate"):
        model = tiny_cifar_resnet()
        args = make_args(
            tmp_path, stim_method="stpp", bn_policy=policy, eval_strategy="steps", eval_steps=1, max_steps=3
        )
        trainer = StimulativeTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
        torch.manual_seed(0)
        trainer.train()
        results.append(torch.rand(1).item())
    assert results[0] == results[1]


def test_evaluation_runs_full_network_only(tmp_path, tiny_cifar_resnet):
    data = make_dataset(n=32)
    model = tiny_cifar_resnet()
    trainer = StimulativeTrainer(model=model, args=make_args(tmp_path, stim_method="stpp"), eval_dataset=data)
    seen = _record_samples(trainer)
    output = trainer.predict(data)
    assert seen == []
    assert output.predictions.shape == (32, 10)
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=data[:]["pixel_values"]).logits
    np.testing.assert_allclose(output.predictions, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_evaluate_subnets_reports_each(tmp_path, tiny_cifar_resnet):
    from stim_hf.training.metrics import build_compute_metrics, top_k_indices

    data = make_dataset(n=32)
    trainer = StimulativeTrainer(
        model=tiny_cifar_resnet(depth=20),
        args=make_args(tmp_path, stim_method="stpp", num_eval_subnets=3),
        eval_dataset=data,
        compute_metrics=build_compute_metrics(),
        preprocess_logits_for_metrics=top_k_indices,
    )
    results = trainer.evaluate_subnets()
    assert len(results) == 3
    assert len({tuple(map(tuple, r["kept"])) for r in results}) == 3
    for r in results:
        assert 0 <= r["accuracy"] <= 1 and r["depth_fraction"] < 1
    # Fixed: the same seed gives the same sub-networks.
    assert trainer.fixed_subnets(3) == trainer.fixed_subnets(3)


def test_evaluate_subnets_re_estimates_each_and_leaves_the_full_network_as_trained(tmp_path, tiny_cifar_resnet):
    """Each sub-network is scored with its own re-estimated statistics, the inherited figure beside it.

    The full network comes back bit for bit (weights, statistics, batch counters, modes);
    ``bn_recalibration_samples=0`` gives the inherited figures, the old ones.
    """
    from stim_hf.analysis.evaluation import evaluate_model
    from stim_hf.method.batchnorm import subnet_batchnorm_statistics

    data = make_dataset(n=64)
    args = make_args(tmp_path, stim_method="stpp", num_eval_subnets=3, subnet_bn_recalibration_samples=48)
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(depth=20), args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    model = trainer.model.eval()  # as Trainer.predict leaves it
    before, modes = params(model), [m.training for m in model.modules()]
    results = trainer.evaluate_subnets()
    assert all(torch.equal(value, before[key]) for key, value in params(model).items())
    assert [m.training for m in model.modules()] == modes

    inherited = trainer.evaluate_subnets(bn_recalibration_samples=0)
    for ours, old in zip(results, inherited, strict=True):
        assert ours["bn_recalibration_samples"] == 48 and old["bn_recalibration_samples"] == 0
        assert old["accuracy"] == old["accuracy_inherited_bn"] == ours["accuracy_inherited_bn"]
        assert old["loss"] == ours["loss_inherited_bn"] != ours["loss"]

    # The re-estimated figure is the sub-network's accuracy with statistics re-estimated on the trainer's images.
    subnet = trainer.fixed_subnets(3)[0]
    batches = trainer.bn_estimation_batches(48, seed=args.seed)
    eval_batches = [
        {"pixel_values": data[i : i + 32]["pixel_values"], "labels": data[i : i + 32]["labels"]} for i in (0, 32)
    ]
    with subnet_batchnorm_statistics(model, batches, 48, trainer.stages, subnet):
        expected = evaluate_model(model, eval_batches, trainer.stages, subnet)
    assert results[0]["accuracy"] == expected["accuracy"]
    assert results[0]["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_a_model_from_model_init_is_the_one_the_sub_network_passes_shorten(tmp_path, tiny_cifar_resnet):
    """``Trainer.train()`` replaces the model with a fresh one from ``model_init``.

    Its sub-network passes must shorten that model's blocks: the blocks run per step equal those
    of the same run with the model given directly (with the first model's stages, every
    sub-network pass would run the whole fresh model).
    """
    from stim_hf.method import find_residual_family

    def counting(calls):
        def build():
            model = tiny_cifar_resnet()
            for stage in find_residual_family(model)[1]:
                for block in stage.container:
                    block.register_forward_hook(lambda *_: calls.append(1))
            return model

        return build

    data = make_dataset()
    args = make_args(tmp_path, stim_method="stpp", max_steps=3)
    direct_calls, init_calls = [], []
    StimulativeTrainer(model=counting(direct_calls)(), args=args, train_dataset=data).train()
    trainer = StimulativeTrainer(model_init=counting(init_calls), args=args, train_dataset=data)
    first_model = trainer.model
    init_calls.clear()
    trainer.train()
    assert trainer.model is not first_model
    full_blocks = 6
    assert len(init_calls) == len(direct_calls) < 2 * full_blocks * 3


def test_evaluate_subnets_reports_accuracy_without_compute_metrics(tmp_path, tiny_cifar_resnet):
    """The Python API snippet (docs/training.md) passes no metrics: the sub-networks' accuracies are reported anyway."""
    data = make_dataset(n=32)
    trainer = StimulativeTrainer(
        model=tiny_cifar_resnet(depth=20), args=make_args(tmp_path, num_eval_subnets=2), eval_dataset=data
    )
    results = trainer.evaluate_subnets()
    assert all({"accuracy", "top5_accuracy", "loss"} <= set(r) for r in results)
    assert trainer.compute_metrics is None and trainer.preprocess_logits_for_metrics is None
    assert "eval_accuracy" not in trainer.evaluate()  # the Trainer's own evaluation is left as it was


def test_model_without_stages_refused_for_st_but_fine_for_ct(tmp_path):
    from torch import nn
    from transformers.modeling_outputs import ImageClassifierOutput

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3 * 16 * 16, 10)

        def forward(self, pixel_values, labels=None):
            return ImageClassifierOutput(logits=self.linear(pixel_values.flatten(1)))

    with pytest.raises(ModelStructureError, match="no residual stages found in Flat"):
        StimulativeTrainer(model=Flat(), args=make_args(tmp_path, stim_method="stpp"))
    trainer = StimulativeTrainer(model=Flat(), args=make_args(tmp_path, stim_method="ct"), train_dataset=make_dataset())
    trainer.train()
    assert trainer.fixed_subnets(2) == []


def test_sample_space_checked_against_model_before_training(tmp_path, tiny_cifar_resnet):
    with pytest.raises(ConfigError, match="sample_space"):
        StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path, sample_space=[1, 1, 1, 1]))
    with pytest.raises(ConfigError, match="can drop at most 1 blocks"):
        StimulativeTrainer(model=tiny_cifar_resnet(), args=make_args(tmp_path, sample_space=[1, 2, 1]))


def test_plain_training_arguments_refused(tmp_path, tiny_cifar_resnet):
    with pytest.raises(ConfigError, match="needs StimulativeTrainingArguments"):
        StimulativeTrainer(model=tiny_cifar_resnet(), args=TrainingArguments(output_dir=str(tmp_path)))


def test_sequential_backward_equals_summed(tmp_path, tiny_cifar_resnet):
    data = make_dataset()
    results = {}
    for strategy in ("summed", "sequential"):
        model = tiny_cifar_resnet()
        args = make_args(
            tmp_path,
            stim_method="stpp",
            num_subnets=3,
            backward_strategy=strategy,
            gradient_accumulation_steps=2,
            max_steps=2,
            per_device_train_batch_size=8,
        )
        trainer = StimulativeTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        results[strategy] = (params(model), _first_log(trainer))
    for key, value in results["summed"][0].items():
        torch.testing.assert_close(results["sequential"][0][key], value, rtol=1e-5, atol=1e-6)
    for key in ("loss", "ce_loss", "kl_loss"):
        assert results["sequential"][1][key] == pytest.approx(results["summed"][1][key], rel=1e-5)


class _TensorDataset(torch.utils.data.Dataset):
    """Pre-made tensors (``seconds`` of sleep per sample: a data pipeline that cannot keep up)."""

    def __init__(self, n: int, seconds: float = 0.0) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 16, 16, generator=generator)
        self.labels = torch.randint(0, 10, (n,), generator=generator)
        self.seconds = seconds

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        if self.seconds:
            time.sleep(self.seconds)
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def test_data_wait_fraction_shows_a_pipeline_that_cannot_keep_up(tmp_path, tiny_cifar_resnet):
    """Logged with every training loss: near 0 with pre-made tensors, near 1 when every sample takes 30 ms.

    30 ms per sample (240 ms per batch) outweighs a tiny model's step by far even on a loaded machine
    with more threads than cores, where 10 ms per sample gave 0.5-0.6 once."""

    def fractions(dataset) -> list[float]:
        args = StimulativeTrainingArguments(
            output_dir=str(tmp_path), stim_method="ct", per_device_train_batch_size=8, max_steps=6, logging_steps=3,
            use_cpu=True, report_to="none", save_strategy="no", num_eval_subnets=0, disable_tqdm=True,
        )  # fmt: skip
        trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=dataset)
        trainer.train()
        return [entry["data_wait_fraction"] for entry in trainer.state.log_history if "loss" in entry]

    fast, slow = fractions(_TensorDataset(64)), fractions(_TensorDataset(64, seconds=0.03))
    assert len(fast) == len(slow) == 2
    assert all(0 <= f < 0.3 for f in fast), fast
    assert all(f > 0.6 for f in slow), slow
    assert min(slow) > max(fast) + 0.3, (fast, slow)


def _pace_logs(tmp_path, model, train, evaluation=None, **kwargs) -> list[dict]:
    args = make_args(tmp_path, stim_method="ct", per_device_train_batch_size=8, per_device_eval_batch_size=4,
                     max_steps=6, logging_steps=2, num_eval_subnets=0, **kwargs)  # fmt: skip
    trainer = StimulativeTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_samples_per_second_is_logged_with_every_training_loss_and_bounded_by_the_data(tmp_path, tiny_cifar_resnet):
    """Images per second of each logging interval; 50 ms per sample in the training process caps it at 20.

    (10 ms, a cap of 100, was too close: with 2 threads on a loaded machine the fast run gave 39.)"""
    fast = _pace_logs(tmp_path, tiny_cifar_resnet(), _TensorDataset(64))
    slow = _pace_logs(tmp_path, tiny_cifar_resnet(), _TensorDataset(64, seconds=0.05))
    assert len(fast) == len(slow) == 3
    assert all(0 < entry["samples_per_second"] <= 20 for entry in slow), slow
    assert min(e["samples_per_second"] for e in fast) > max(e["samples_per_second"] for e in slow), (fast, slow)


def test_samples_per_second_counts_every_micro_batch(tmp_path, tiny_cifar_resnet):
    """With gradient accumulation each interval counts all its micro-batches' images (2 steps x 2 x 8 = 32)."""
    args = make_args(tmp_path, stim_method="ct", per_device_train_batch_size=8, gradient_accumulation_steps=2,
                     max_steps=6, logging_steps=2)  # fmt: skip
    trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, train_dataset=_TensorDataset(128))
    taken = []
    take_interval = trainer.pace.take_interval
    trainer.pace.take_interval = lambda: taken.append(take_interval()) or taken[-1]
    trainer.train()
    assert [samples for _, samples, _ in taken] == [32, 32, 32]
    logged = [entry["samples_per_second"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [samples / seconds for _, samples, seconds in taken]


def test_samples_per_second_leaves_evaluation_out(tmp_path, tiny_cifar_resnet):
    """An evaluation after every step (1.6 s each) is not training time: it would cap the pace near 10 images/s."""
    logs = _pace_logs(
        tmp_path, tiny_cifar_resnet(), _TensorDataset(64), _TensorDataset(8, seconds=0.2),
        eval_strategy="steps", eval_steps=1,
    )  # fmt: skip
    assert len(logs) == 3
    # Counted, two steps of 8 images per interval would take over 3.2 s: below 5 images/s. Left out, a loaded
    # machine with more threads than cores still gave the tiny model 39 images/s or more.
    assert all(entry["samples_per_second"] > 10 for entry in logs), logs


@pytest.mark.skipif(accelerator_available(), reason="pinning is right with an accelerator")
def test_no_pin_memory_warning_on_a_cpu_without_use_cpu(tmp_path, tiny_cifar_resnet):
    """The CIFAR recipes leave use_cpu unset: on a CPU, evaluation must not warn about pinned memory.

    Pinning asked for explicitly still warns (torch's warning is then one the user can act on).
    """

    def pin_memory_warnings(**kwargs) -> list[str]:
        args = make_args(tmp_path, use_cpu=False, stim_method="ct", **kwargs)
        trainer = StimulativeTrainer(model=tiny_cifar_resnet(), args=args, eval_dataset=make_dataset(n=16))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.evaluate()
        return [str(w.message) for w in caught if "pin_memory" in str(w.message)]

    assert pin_memory_warnings() == []
    assert pin_memory_warnings(dataloader_pin_memory=True)

"""Real multi-process launches on the CPU (gloo): DDP correctness, two "machines", mixed precision."""

import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file

WORKER = str(REPO_ROOT / "tests" / "launch" / "train_worker.py")
CPU_CONFIG = str(REPO_ROOT / "configs" / "accelerate" / "cpu_multi_process.yaml")
QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1")


def run(cmd, cwd, timeout=300):
    result = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:  # the whole output, in the report's captured output (the assertion is cut short)
        print(f"$ {' '.join(map(str, cmd))}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


def accelerate_launch(*args) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *args]


def load_rank(out, rank):
    return load_file(str(out / f"rank{rank}.safetensors")), json.loads((out / f"rank{rank}_subnets.json").read_text())


def test_two_processes_match_each_other_and_one_process(tmp_path):
    """K = 2, gradient accumulation 2, 2 x 8 images per micro-batch against 1 x 16.

    The worker's model has no BatchNorm, so a batch's loss is the mean of its samples' losses and
    two processes of 8 images compute exactly the gradient of one of 16 (up to summation order);
    the sequential sampler gives both runs the same micro-batches.
    """
    multi, single = tmp_path / "multi", tmp_path / "single"
    run(accelerate_launch("--config_file", CPU_CONFIG, "--main_process_port", str(free_port()),
                          WORKER, "--out", str(multi), "--per_device_batch", "8", "--ga", "2", "--num_subnets", "2"),
        cwd=tmp_path)  # fmt: skip
    run([sys.executable, WORKER, "--out", str(single), "--per_device_batch", "16", "--ga", "2", "--num_subnets", "2"],
        cwd=tmp_path)  # fmt: skip
    # The sequential backward strategy (no DDP sync, one all-reduce per step) gives the same update.
    sequential = tmp_path / "sequential"
    run(accelerate_launch("--config_file", CPU_CONFIG, "--main_process_port", str(free_port()),
                          WORKER, "--out", str(sequential), "--per_device_batch", "8", "--ga", "2", "--num_subnets", "2",
                          "--backward_strategy", "sequential"),
        cwd=tmp_path)  # fmt: skip
    rank0, record0 = load_rank(multi, 0)
    for rank in (0, 1):
        for key, value in load_rank(sequential, rank)[0].items():
            torch.testing.assert_close(value, rank0[key], rtol=0, atol=1e-6)
    # Ending the run joins gloo's threads, so none of them is left to free tensors while Python shuts down.
    for out in (multi, sequential):
        for rank in (0, 1):
            teardown = json.loads((out / f"rank{rank}_teardown.json").read_text())
            if teardown["threads_before_end"] is not None:  # Linux lists a process's threads in /proc
                assert teardown["threads_after_end"] < teardown["threads_before_end"], teardown
    rank1, record1 = load_rank(multi, 1)
    alone, record_alone = load_rank(single, 0)
    assert record0["world_size"] == 2 and record_alone["world_size"] == 1
    # Every rank drew the same sub-networks and input sizes at every step, and so did one process.
    assert len(record0["subnets"]) == 3 * 2 * 2
    assert record0["subnets"] == record1["subnets"] == record_alone["subnets"]
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], alone[key], rtol=0, atol=1e-6)
    # Auxiliary losses are reduced across ranks before logging: both ranks log the same values,
    # equal to the single process's.
    for log0, log1, log_alone in zip(record0["logs"], record1["logs"], record_alone["logs"], strict=True):
        for key in ("loss", "ce_loss", "kl_loss", "subnet_depth_fraction", "subnet_input_size"):
            assert log0[key] == pytest.approx(log1[key], rel=1e-6)
            assert log0[key] == pytest.approx(log_alone[key], rel=1e-5)
        # The pace is gathered across processes too (each rank times its own interval).
        assert log0["samples_per_second"] > 0 and log1["samples_per_second"] > 0
        assert log0["data_wait_fraction"] == log1["data_wait_fraction"]


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Only the last rank's loss is inf at step 2: the all-reduced check makes every rank skip it alike."""
    out = tmp_path / "out"
    run(accelerate_launch("--config_file", CPU_CONFIG, "--main_process_port", str(free_port()),
                          WORKER, "--out", str(out), "--per_device_batch", "8", "--ga", "2", "--num_subnets", "1",
                          "--on_nonfinite_loss", "skip", "--poison_step", "2"),
        cwd=tmp_path)  # fmt: skip
    (rank0, record0), (rank1, record1) = load_rank(out, 0), load_rank(out, 1)
    assert record0["skipped_steps"] == record1["skipped_steps"] == 1
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    for record in (record0, record1):
        assert [log.get("nonfinite_skipped_steps", 0) for log in record["logs"]] == [0, 1.0, 1.0]
        assert all(math.isfinite(log["loss"]) for log in record["logs"])


@pytest.mark.parametrize("model", ["stem_bn", "cifar"])
def test_sub_network_statistics_re_estimated_by_two_processes_are_those_of_one(tmp_path, model):
    """Two processes re-estimate on 24 images each and pool: every rank scores the sub-networks alike.

    With one BatchNorm whose input depends on no other (``stem_bn``) the pooled statistics are
    exactly those one process computes on all 48 images, so the scores are one process's. With
    BatchNorm throughout (``cifar``), deeper layers see activations normalised by other batches than
    in one process (as in any train-mode estimate), so the scores are close, not equal. The models are
    not trained (both runs start from the same weights), and the full network is left as it was.
    """
    multi, single = tmp_path / "multi", tmp_path / "single"
    common = ["--model", model, "--no_train", "--evaluate_subnets", "48"]
    run(accelerate_launch("--config_file", CPU_CONFIG, "--main_process_port", str(free_port()),
                          WORKER, "--out", str(multi), *common), cwd=tmp_path)  # fmt: skip
    run([sys.executable, WORKER, "--out", str(single), *common], cwd=tmp_path)
    (rank0, record0), (rank1, record1) = load_rank(multi, 0), load_rank(multi, 1)
    alone, record_alone = load_rank(single, 0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]) and torch.equal(rank0[key], alone[key]), key
    assert record0["subnet_results"] == record1["subnet_results"]
    for ours, theirs in zip(record0["subnet_results"], record_alone["subnet_results"], strict=True):
        assert ours["bn_recalibration_samples"] == theirs["bn_recalibration_samples"] == 48
        assert ours["accuracy_inherited_bn"] == theirs["accuracy_inherited_bn"]
        assert ours["loss_inherited_bn"] == pytest.approx(theirs["loss_inherited_bn"], rel=1e-6)
        assert ours["loss"] != ours["loss_inherited_bn"]
        if model == "stem_bn":
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
            assert ours["accuracy"] == theirs["accuracy"]
        else:
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-2)


def single_process_accuracy(checkpoint) -> float:
    """Top-1 of a quickstart checkpoint on the quickstart's validation split, in this process."""
    from torch.utils.data import DataLoader
    from transformers import AutoModelForImageClassification

    from stim_hf.data.image_datasets import DataArguments, load_image_datasets
    from stim_hf.data.transforms import collate_image_batch, with_image_transforms

    data_args = DataArguments(dataset_name="sklearn:digits", train_val_split=0.2, image_size=16)
    split = with_image_transforms(load_image_datasets(data_args, seed=42)["validation"], data_args, train=False)
    model = AutoModelForImageClassification.from_pretrained(checkpoint).eval()
    correct = 0
    with torch.no_grad():
        for batch in DataLoader(split, batch_size=128, collate_fn=collate_image_batch):
            correct += (model(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).sum().item()
    return correct / len(split)


def test_two_machines_on_localhost_then_resume_in_one_process(tmp_path):
    out = tmp_path / "run"
    port = str(free_port())
    common = [
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        port,
    ]
    train_args = [QUICKSTART, "--output_dir", str(out), "--max_steps", "4", "--save_strategy", "steps",
                  "--save_steps", "4", "--eval_strategy", "no", "--report_to", "none", "--num_eval_subnets", "0",
                  "--disable_tqdm", "true", "--use_cpu", "true", "--profile_steps", "2-3"]  # fmt: skip
    script = str(REPO_ROOT / "scripts" / "train.py")
    machines = [
        subprocess.Popen(
            accelerate_launch("--config_file", CPU_CONFIG, *common, "--machine_rank", str(rank), script, *train_args),
            cwd=tmp_path,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    deadline = time.time() + 300
    outputs = [m.communicate(timeout=max(1, deadline - time.time())) for m in machines]
    for machine, (stdout, stderr) in zip(machines, outputs, strict=True):
        if machine.returncode != 0:  # the whole output, in the report's captured output (the assertion is cut short)
            print(f"$ {' '.join(map(str, machine.args))}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
        assert machine.returncode == 0, (stdout[-2000:], stderr[-4000:])
    checkpoint = out / "checkpoint-4"
    assert (checkpoint / "model.safetensors").is_file()
    # profile_steps: every process records the window into its own files.
    assert sorted(p.name for p in (out / "profile").glob("*.txt")) == ["rank0_steps2-3.txt", "rank1_steps2-3.txt"]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # Evaluation gathered the predictions of both processes: the accuracy is a one-process evaluation's of the same
    # weights on the whole validation split, to within two of the 360 images (each process runs other batch shapes,
    # so a near-tie can flip; on a new machine one did, 53 against 54 right).
    evaluated = json.loads((out / "eval_results.json").read_text())
    assert evaluated["eval_samples"] == 360
    assert evaluated["eval_accuracy"] == pytest.approx(single_process_accuracy(checkpoint), abs=2 / 360 + 1e-9)
    # The two-machine checkpoint resumes in a single process.
    resumed = run([sys.executable, script, *train_args[:3], "--max_steps", "6", *train_args[5:],
                   "--resume_from_checkpoint", str(checkpoint)], cwd=tmp_path)  # fmt: skip
    assert "Traceback" not in resumed.stderr
    final = json.loads((out / "trainer_state.json").read_text())
    assert final["global_step"] == 6


def test_bf16_autocast_on_cpu_trains_with_finite_losses(tmp_path):
    out = tmp_path / "bf16"
    run([sys.executable, WORKER, "--out", str(out), "--model", "cifar", "--bf16", "--steps", "3"], cwd=tmp_path)
    _, record = load_rank(out, 0)
    assert len(record["logs"]) == 3
    for log in record["logs"]:
        for key in ("loss", "ce_loss", "kl_loss"):
            assert torch.isfinite(torch.tensor(log[key])), log


def test_channels_last_trains_like_contiguous(tmp_path):
    results = {}
    for name, flags in (("plain", []), ("channels_last", ["--channels_last"])):
        out = tmp_path / name
        run([sys.executable, WORKER, "--out", str(out), "--model", "cifar", "--steps", "2", *flags], cwd=tmp_path)
        results[name] = load_rank(out, 0)[0]
    for key, value in results["plain"].items():
        torch.testing.assert_close(results["channels_last"][key], value, rtol=1e-4, atol=1e-5)


def test_channels_last_images_into_a_channels_first_model_keep_ddp_quiet(tmp_path):
    """The predecoded pipeline's channels-last images with ``channels_last: false``: the trainer hands DDP
    channels-first inputs, so the weight gradients match DDP's buckets (no stride warning, no copy)."""
    out = tmp_path / "images_channels_last"
    result = run(accelerate_launch("--config_file", CPU_CONFIG, "--main_process_port", str(free_port()), WORKER,
                                   "--out", str(out), "--model", "cifar", "--steps", "2", "--channels_last_images"),
                 cwd=tmp_path)  # fmt: skip
    assert "Grad strides do not match bucket view strides" not in result.stderr

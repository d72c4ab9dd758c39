"""The Trainer's progress in a log: whole lines (steps, rate, time left, the logged metrics), no carriage returns."""

import re

from conftest import make_tensor_dataset
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments
from stim_hf.tools.trainer_progress import LineProgressCallback, use_line_progress_in_logs


def _trainer(tmp_path, model, **kwargs):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        stim_method="stpp",
        num_subnets=1,
        per_device_train_batch_size=16,
        learning_rate=0.05,
        optim="sgd",
        max_steps=4,
        logging_steps=2,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        seed=3,
        subnet_monitor_count=0,
        num_eval_subnets=0,
    )
    settings.update(kwargs)
    return StimulativeTrainer(
        model=model, args=StimulativeTrainingArguments(**settings), train_dataset=make_tensor_dataset(n=64)
    )


def _progress_callbacks(trainer):
    return [type(c) for c in trainer.callback_handler.callbacks if isinstance(c, (ProgressCallback, PrinterCallback))]


def test_a_log_gets_whole_lines_and_a_resumed_run_counts_from_its_checkpoint(tmp_path, tiny_cifar_resnet, capsys):
    trainer = _trainer(tmp_path, tiny_cifar_resnet())
    assert _progress_callbacks(trainer) == [ProgressCallback]
    assert use_line_progress_in_logs(trainer, every_s=0)  # pytest's captured stderr is no terminal
    assert _progress_callbacks(trainer) == [LineProgressCallback]
    trainer.train()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("training: ")]
    assert lines[0] == "training: 0/4 steps (0%), 0 s"
    assert [int(re.match(r"training: (\d+)/4 steps", line)[1]) for line in lines] == [0, 1, 2, 3, 4]
    assert re.fullmatch(r"training: 2/4 steps \(50%\), \d+ s, [\d.e+]+ steps/s, about \d+ s left", lines[2])
    assert re.fullmatch(r"training: 4/4 steps \(100%\), \d+ s, done", lines[-1])
    losses = [line for line in err.splitlines() if line.startswith("{'loss': ")]
    assert len(losses) == 2  # logging_steps 2 of 4: each logged dict on a line of its own

    resumed = _trainer(tmp_path, tiny_cifar_resnet())
    use_line_progress_in_logs(resumed, every_s=0)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training: ")]
    assert lines[0] == "training: 2/4 steps (50%), 0 s"
    assert re.fullmatch(r"training: 3/4 steps \(75%\), \d+ s, [\d.e+]+ steps/s, about \d+ s left", lines[1])
    assert lines[-1].startswith("training: 4/4 steps (100%)") and lines[-1].endswith(", done")


def test_the_trainers_own_display_stays_where_asked(tmp_path, tiny_cifar_resnet, monkeypatch):
    quiet = _trainer(tmp_path, tiny_cifar_resnet(), disable_tqdm=True)
    assert not use_line_progress_in_logs(quiet)
    assert _progress_callbacks(quiet) == [PrinterCallback]

    import stim_hf.tools.trainer_progress as trainer_progress

    monkeypatch.setattr(trainer_progress, "shows_bars", lambda stream: True)  # a terminal, or a notebook
    shown = _trainer(tmp_path, tiny_cifar_resnet())
    assert not use_line_progress_in_logs(shown)
    assert _progress_callbacks(shown) == [ProgressCallback]

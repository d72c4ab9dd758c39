"""``datasets``' progress in a log: a line when loading or decoding starts and one when it ends, no carriage returns."""

import re

import datasets
import pytest

from stim_hf.data.builtin_datasets import load_builtin_dataset
from stim_hf.data.image_datasets import DataArguments, load_image_datasets
from stim_hf.data.predecoded import with_predecoded_transforms
from stim_hf.tools import datasets_progress
from stim_hf.tools.datasets_progress import datasets_work_in_lines


@pytest.fixture
def digits_files(tmp_path):
    digits = load_builtin_dataset("sklearn:digits")["train"]
    digits.select(range(96)).to_parquet(str(tmp_path / "train.parquet"))
    digits.select(range(96, 128)).to_parquet(str(tmp_path / "validation.parquet"))
    return DataArguments(
        train_file=str(tmp_path / "train.parquet"),
        validation_file=str(tmp_path / "validation.parquet"),
        dataset_cache_dir=str(tmp_path / "cache"),  # a fresh cache: datasets generates the splits and maps anew
        image_size=8,
        image_pipeline="predecoded",
        augmentation="cifar",
    )


def test_loading_and_decoding_in_a_log_are_two_lines_each(digits_files, capsys, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    assert not datasets.are_progress_bars_disabled()
    with datasets_work_in_lines("loading the images") as in_lines:  # pytest's captured stderr is no terminal
        assert in_lines and datasets.are_progress_bars_disabled()
        splits = load_image_datasets(digits_files, seed=0)
    with datasets_work_in_lines("preparing the image pipeline"):
        decoded = with_predecoded_transforms(splits["train"], digits_files, train=True)
    assert len(decoded) == 96 and not datasets.are_progress_bars_disabled()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0] == "loading the images ..."
    assert re.fullmatch(r"loading the images: done, \d+ s", lines[1])
    assert lines[2] == "preparing the image pipeline ..."
    assert re.fullmatch(r"preparing the image pipeline: done, \d+ s", lines[3])
    assert len(lines) == 4

    # Without the block the same work draws datasets' bar, carriage returns and all: what the block spares a log.
    with_predecoded_transforms(splits["validation"], digits_files, train=False)
    assert "\r" in capsys.readouterr().err


def test_work_that_fails_says_it_stopped_and_gives_the_bars_back(capsys, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    with pytest.raises(RuntimeError), datasets_work_in_lines("decoding"):
        raise RuntimeError("an undecodable image")
    assert re.fullmatch(r"decoding \.\.\.\ndecoding: stopped, \d+ s\n", capsys.readouterr().err)
    assert not datasets.are_progress_bars_disabled()


def test_bars_stay_as_they_are_on_a_terminal_or_where_the_user_set_them(capsys, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(datasets_progress, "shows_bars", lambda stream: True)  # a terminal, or a notebook
    with datasets_work_in_lines("loading") as in_lines:
        assert not in_lines and not datasets.are_progress_bars_disabled()
    monkeypatch.undo()

    datasets.disable_progress_bars()  # switched off by the user (or by an enclosing block): off, and no lines
    try:
        with datasets_work_in_lines("loading") as in_lines:
            assert not in_lines and datasets.are_progress_bars_disabled()
        assert datasets.are_progress_bars_disabled()
    finally:
        datasets.enable_progress_bars()

    # A command's --progress false: the bars off for the block and no lines, on a terminal too.
    for terminal in (False, True):
        monkeypatch.setattr(datasets_progress, "shows_bars", lambda stream, terminal=terminal: terminal)
        with datasets_work_in_lines("loading", show=False) as in_lines:
            assert not in_lines and datasets.are_progress_bars_disabled()
        assert not datasets.are_progress_bars_disabled()
    monkeypatch.undo()

    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "0")  # the user asks for the bars: they win
    with datasets_work_in_lines("loading") as in_lines:
        assert not in_lines and not datasets.are_progress_bars_disabled()
    assert capsys.readouterr().err == ""

"""docs/training.md, "After the quickstart": the search, export and pipeline() commands a new user runs next work as
written there, on a (shortened) quickstart output."""

from __future__ import annotations

import ast
import json
import re
import runpy
import shlex

from conftest import REPO_ROOT

from stim_hf.cli import main as cli_main


def first_hour_blocks() -> tuple[list[list[str]], str]:
    """The section's stim-hf commands (as argv) and its Python snippet."""
    text = (REPO_ROOT / "docs" / "training.md").read_text()
    section = text.split("## After the quickstart: search, export, load", 1)[1].split("\n## ", 1)[0]
    commands = [shlex.split(block) for block in re.findall(r"```bash\n(stim-hf .*?)\n```", section, flags=re.S)]
    [snippet] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return commands, snippet


def test_the_documented_next_steps_run(tmp_path, monkeypatch, capsys):
    (search, export), snippet = first_hour_blocks()
    assert search[:3] == ["stim-hf", "search", "outputs/quickstart"] and export[:2] == ["stim-hf", "export"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.yaml").write_text((REPO_ROOT / "configs" / "quickstart.yaml").read_text())
    # The quickstart itself, shortened (its full run: test_train_job); then the documented commands as written.
    assert cli_main(["train", "configs/quickstart.yaml", "--num_train_epochs", "2", "--disable_tqdm", "true",
                     "--num_eval_subnets", "0", "--report_to", "none"]) == 0  # fmt: skip
    capsys.readouterr()
    assert cli_main([*search[1:], "--progress", "false"]) == 0
    printed = capsys.readouterr().out
    assert "| quickstart |" in printed and "wrote outputs/search/pareto.json" in printed
    report = json.loads((tmp_path / "outputs" / "search" / "pareto.json").read_text())
    # The digits' 1,437 training images hold neither default count: half each, as the section's output says.
    assert (report["settings"]["holdout_samples"], report["settings"]["recalibrate_bn"]) == (718, 719)
    pick = report["checkpoints"][0]["pick"]
    # This shortened run's pick may differ from the documented one: export the pick this search found.
    argv = export[1:]
    argv[argv.index("--depths") + 1] = ",".join(map(str, pick["depths"]))
    argv[argv.index("--input-size") + 1] = str(pick["input_size"])
    assert cli_main(argv) == 0
    assert re.search(r"exported depths=[\d,]+ of outputs/quickstart to outputs/pick: .* top-1 \d+\.\d\d%",
                     capsys.readouterr().out)  # fmt: skip
    # The pick runs at its input size behind the trained processor: the CIFAR ResNet resizes its input itself.
    processor = json.loads((tmp_path / "outputs" / "pick" / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 16, "width": 16}
    config = json.loads((tmp_path / "outputs" / "pick" / "config.json").read_text())
    assert config["resize_input_to"] == (pick["input_size"] if pick["input_size"] != 16 else None)
    script = tmp_path / "first_pipeline.py"
    script.write_text(snippet)
    runpy.run_path(str(script), run_name="__main__")
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[{'label'")]
    predictions = ast.literal_eval(line)
    assert len(predictions) == 3 and {p["label"] for p in predictions} <= {str(i) for i in range(10)}
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6

"""What scoring sub-networks with re-estimated BatchNorm statistics adds to the quickstart's wall time.

  python bench/quickstart_recalibration_cost.py --repeats 3

Runs ``stim-hf train configs/quickstart.yaml`` (the README's second command) ``--repeats`` times with its
default ``subnet_bn_recalibration_samples`` (1,024) and as many times with 0 (the sub-networks scored
with the full network's statistics only, the behaviour before issue 16), alternating, each a fresh
process into its own output folder, and prints every wall time, the medians and their ratio. Alternating
runs side by side keeps a shared machine's drift out of the ratio as far as it can be.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"re-estimated (1024, default)": [], "inherited only (0)": ["--subnet_bn_recalibration_samples", "0"]}


def run_quickstart(extra: list[str], output_dir: Path) -> tuple[float, dict]:
    """Wall seconds of one quickstart run and its ``all_results.json``."""
    command = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        str(REPO / "configs" / "quickstart.yaml"),
        "--output_dir",
        str(output_dir),
        "--disable_tqdm",
        "true",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return seconds, json.loads((output_dir / "all_results.json").read_text())


def main(argv: list[str] | None = None) -> None:
    """Alternate the two settings, then print the medians and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for index, (name, extra) in enumerate(SETTINGS.items()):
                seconds, results = run_quickstart(extra, Path(tmp) / f"{repeat}_{index}")
                times[name].append(seconds)
                subnets = results.get("eval_subnet_accuracy_mean")
                print(f"run {repeat + 1}, {name}: {seconds:.1f} s (mean sub-network top-1 {subnets})", flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    new, old = medians.values()
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs")
    for name, median in medians.items():
        print(f"{name}: median {median:.1f} s over {args.repeats} runs ({', '.join(f'{t:.1f}' for t in times[name])})")
    print(f"re-estimation adds {new - old:.1f} s: {100 * (new / old - 1):+.1f} % of the quickstart's wall time")


if __name__ == "__main__":
    main()

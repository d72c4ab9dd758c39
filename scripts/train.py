"""Train a residual network stimulatively: ``python scripts/train.py CONFIG.yaml [--field value ...]``.

Works under ``accelerate launch`` too:
``accelerate launch --config_file configs/accelerate/multi_gpu.yaml scripts/train.py configs/x.yaml``.
"""

import sys

from stim_hf.cli import run_guarded
from stim_hf.train import main

if __name__ == "__main__":
    sys.exit(run_guarded(lambda: main(sys.argv[1:]), prog="train.py"))

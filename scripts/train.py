"""Train a residual network stimulatively: ``python scripts/train.py RECIPE.yaml [--field value ...]``.

The same job as ``stim-hf train`` (``--config RECIPE.yaml`` works too), with the same usage and
``stim-hf: error: ...`` messages. Works under ``accelerate launch`` too:
``accelerate launch --config_file configs/accelerate/multi_gpu.yaml scripts/train.py configs/x.yaml``.
"""

import sys

from stim_hf.cli import run_guarded
from stim_hf.cli.train import main

if __name__ == "__main__":
    sys.exit(run_guarded(lambda: main(sys.argv[1:])))

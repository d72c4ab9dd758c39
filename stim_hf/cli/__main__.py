"""``python -m stim_hf.cli COMMAND ...``: the same as ``stim-hf COMMAND ...``."""

import sys

from stim_hf.cli.dispatch import main

if __name__ == "__main__":
    sys.exit(main())

"""The ``stim-hf`` command line: ``stim-hf train RECIPE.yaml [--field value ...]``, ``export``, ``finetune``, ``loafing``,
``search``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from stim_hf.errors import StimError

USAGE = """usage: stim-hf COMMAND [ARGS ...]

commands:
{commands}

Run 'stim-hf COMMAND --help' for the arguments of a command."""


def _train(argv: Sequence[str]) -> None:
    from stim_hf.cli.train import main

    main(argv)


def _export(argv: Sequence[str]) -> None:
    from stim_hf.tools.export_cli import main

    main(argv)


def _finetune(argv: Sequence[str]) -> None:
    from stim_hf.tools.finetune_cli import main

    main(argv)


def _loafing(argv: Sequence[str]) -> None:
    from stim_hf.tools.loafing import main

    main(argv)


def _search(argv: Sequence[str]) -> None:
    from stim_hf.tools.search import main

    main(argv)


# Subcommand name -> (runner taking the remaining arguments, one-line description).
COMMANDS: dict[str, tuple[Callable[[Sequence[str]], object], str]] = {
    "train": (
        _train,
        "train a model from a YAML recipe (RECIPE.yaml or --config RECIPE.yaml) plus --field value overrides",
    ),
    "export": (_export, "write a sub-network of a checkpoint as a standalone model"),
    "finetune": (_finetune, "fine-tune an exported sub-network towards the full network it came from (KL)"),
    "loafing": (_loafing, "evaluate the full network and fixed sub-networks of checkpoints (loafing analysis)"),
    "search": (_search, "find the best sub-networks under a FLOPs, parameter or latency budget (Pareto front)"),
}


def run_guarded(runner: Callable[[], object], prog: str = "stim-hf") -> int:
    """Run ``runner``; report a :class:`StimError` as one clear line instead of a traceback.

    So is an ``OSError`` that only a write raises (no space, a quota, a read-only filesystem).

    The line starts on a line of its own and ends with a line break, also when the error stopped a
    progress bar mid-line (a non-finite loss stops training with the Trainer's bar drawn).
    """
    from stim_hf.training.write_failures import stray_write_failure

    try:
        runner()
    except (StimError, OSError) as err:
        # An OSError: a full disk or a read-only filesystem outside the guarded writes, or re-raised.
        reported = err if isinstance(err, StimError) else stray_write_failure(err)
        if reported is None:
            raise
        end_progress_bars()
        sys.stderr.write(f"{prog}: error: {str(reported).rstrip()}\n")
        sys.stderr.flush()
        return 2
    return 0


def end_progress_bars() -> None:
    """Close the tqdm progress bars still open, each leaving its line finished (or cleared) as on a normal close."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # every open bar, whichever tqdm class drew it (a WeakSet of tqdm's)
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a subcommand; exit status 2 for usage and configuration errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = "\n".join(f"  {name:<10}{description}" for name, (_, description) in COMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(commands=commands))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"stim-hf: error: unknown command '{name}'\n" + USAGE.format(commands=commands), file=sys.stderr)
        return 2
    runner = COMMANDS[name][0]
    return run_guarded(lambda: runner(rest))


if __name__ == "__main__":
    sys.exit(main())

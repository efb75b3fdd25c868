"""Entry point of `./pants run src/driver:train` (the ES fine-tuning run).

The training loop is not wired up yet (tracked in the "./pants run src/driver:train" issue); until then
the command says so and exits with status 2 instead of pretending to train.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Runs the command. Returns the process exit status (2: training is not available yet)."""
    del argv
    print(
        "hermetic-es: the ES training loop is not available in this revision yet.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())

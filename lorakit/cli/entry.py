"""The `lorakit` console script: a Ctrl-C or SIGTERM at any moment, even while Python is still importing the
commands (before their own handling), ends with exit 130 and no traceback."""

from __future__ import annotations

import signal
import sys


def main() -> None:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM takes Ctrl-C's path
    try:
        from lorakit.cli.app import app

        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None

"""User-facing errors: one line that names the problem and the fix, exit code 2."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user (paths, configs, checkpoints). Never a bug of ours."""


def cli_main(fn: Callable[[], object]) -> Callable[[], None]:
    """Wrap a script's ``main``: a ``UserError`` prints ``error: ...`` and exits 2, no traceback."""

    @functools.wraps(fn)
    def wrapper() -> None:
        try:
            fn()
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper

"""The one exception type for a user's mistake, and how both CLIs turn failures into one line and an exit code."""

import errno
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input that the user can fix; its message names the problem and what to do."""


def run_cli(prog: str, run: Callable[[], int | None]) -> int:
    """Call `run`; a UserError, Ctrl-C or a full disk becomes one line on stderr and a non-zero exit code."""
    try:
        return run() or 0
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        print(f"{prog}: error: the disk is full; free some space and run again (nothing was written)",
              file=sys.stderr)
        return 1

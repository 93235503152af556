"""The one exception type for a user's mistake, and how both CLIs turn failures into one line and an exit code."""

import errno
import signal
import sys
import threading
from collections.abc import Callable


class UserError(Exception):
    """Bad input that the user can fix; its message names the problem and what to do."""


class Stopped(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C (so that partial output is removed), exit 128 + signal.

    A BaseException, like KeyboardInterrupt, so that libraries' `except Exception` do not swallow it (tqdm's
    constructor did, and the export went on)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def run_cli(prog: str, run: Callable[[], int | None]) -> int:
    """Call `run`; a UserError, Ctrl-C, SIGTERM/SIGHUP or a full disk becomes one line on stderr and a non-zero
    exit code (2 for a user's mistake, 1 for a full disk, 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""
    in_main = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGHUP)} if in_main else {}
    try:
        return run() or 0
    except Stopped as exc:
        print(f"\n{prog}: stopped by {exc}; nothing was written", file=sys.stderr)
        return 128 + exc.signum
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
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

"""The exceptions for a user's mistakes, and how the CLIs turn failures into one line and an exit code."""

import errno
import signal
import sys
import threading
from collections.abc import Callable, Mapping


class UserError(Exception):
    """Bad input that the user can fix; its message names the problem and what to do.

    A message may name the settings or arguments at fault as `{name}` placeholders (listed in `fields`), so that
    each front end words them in its own terms: `str(error)` uses the Python names (`max_new_tokens`), dg-run its
    flags (`-n/--max-new-tokens`), dg-serve its API fields (`max_tokens`); see `worded`."""

    def __init__(self, message: str, *fields: str):
        self.template, self.fields = message, fields
        super().__init__(self.worded())

    @property
    def field(self) -> str | None:
        """The first setting or argument at fault, by its Python name (None: the input as a whole)."""
        return self.fields[0] if self.fields else None

    def worded(self, names: Mapping[str, str] | None = None) -> str:
        """The message with each field named as `names` says (its Python name where `names` has none)."""
        message = self.template
        for name in self.fields:
            message = message.replace("{" + name + "}", (names or {}).get(name, name))
        return message


class SettingError(UserError):
    """A generation setting or runtime option out of range: `field` is its name, `value` what was given (and
    `fields` all the settings the message names)."""

    def __init__(self, message: str, *fields: str, value=None):
        super().__init__(message, *fields)
        self.value = value


class PromptTooLong(UserError):
    """The prompt (cached tokens included) plus the new tokens need more positions than the model has."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, needed: int, max_positions: int):
        super().__init__(f"the prompt ({prompt_tokens} tokens) plus {max_new_tokens} new tokens needs {needed} "
                         f"positions; the model has {max_positions}: shorten the prompt or lower {{max_new_tokens}}",
                         "max_new_tokens")
        self.prompt_tokens, self.max_new_tokens = prompt_tokens, max_new_tokens
        self.needed, self.max_positions = needed, max_positions


class ArtifactError(UserError):
    """The artifact folder is missing, incomplete, corrupted or of another format version: `path` names it."""

    def __init__(self, message: str, path):
        super().__init__(message)
        self.path = path


class BackendUnavailable(UserError):
    """The backend or device asked for is not installed or not present (`backend`, `device`)."""

    def __init__(self, message: str, backend: str, device: str | None = None):
        super().__init__(message, "device" if "{device}" in message else "backend", "backend")
        self.backend, self.device = backend, device


class NotEnoughMemory(UserError):
    """The artifact's run would not fit the memory available (bytes `needed` and `available`)."""

    def __init__(self, message: str, needed: int, available: int):
        super().__init__(message)
        self.needed, self.available = needed, available


class Stopped(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C (so that partial output is removed), exit 128 + signal.

    A BaseException, like KeyboardInterrupt, so that libraries' `except Exception` do not swallow it (tqdm's
    constructor did, and the export went on)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def run_cli(prog: str, run: Callable[[], int | None], names: Mapping[str, str] | None = None) -> int:
    """Call `run`; a UserError, Ctrl-C, SIGTERM/SIGHUP or a full disk becomes one line on stderr and a non-zero
    exit code (2 for a user's mistake, 1 for a full disk, 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP).
    `names`: the command's own names (its flags) for the settings a UserError names."""
    in_main = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGHUP)} if in_main else {}
    try:
        return run() or 0
    except Stopped as exc:
        print(f"\n{prog}: stopped by {exc}; nothing was written", file=sys.stderr)
        return 128 + exc.signum
    except UserError as exc:
        print(f"{prog}: error: {exc.worded(names)}", file=sys.stderr)
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

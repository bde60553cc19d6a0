"""Expected failures and the one way the command-line tools report them.

Every failure a user can cause or fix (a bad config, a missing or damaged checkpoint, bad data,
a busy or read-only workdir, a run that diverged) raises a `UserError` subclass whose message is
one line naming the cause and the path or field. The CLIs wrap their `main` in `cli_main`, which
prints `<kind>: <message>` on stderr and exits 1; file-system errors (`OSError`: permission
denied, disk full, ...) are reported the same way. Anything else is a bug and keeps its
traceback.

    from trb_jax.errors import DataError, cli_main
    raise DataError(f"{path}:{line}: field 'answer' is null")

    if __name__ == "__main__":
        app.run(cli_main(main), flags_parser=config_flags_parser)   # absl tools (config_files)
        cli_main(main)()                                            # argparse tools
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = [
    "UserError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "WorkdirError",
    "NonFiniteError",
    "one_line",
    "cli_main",
    "die",
    "check_writable",
    "atomic_write",
    "EXIT_CODE",
]

EXIT_CODE = 1


class UserError(Exception):
    """An expected failure; str(e) is one line naming the cause and the field or path."""

    kind = "error"


class ConfigError(UserError, ValueError):
    """A bad configuration value; the message names the dotted field."""

    kind = "config error"


class DataError(UserError, ValueError):
    """A data file or record that cannot be used; the message names file, line/record, field."""

    kind = "data error"


class CheckpointError(UserError, ValueError):
    """A model or training checkpoint that is missing or cannot be read; names the path."""

    kind = "checkpoint error"


class WorkdirError(UserError):
    """The workdir is held by another trainer, or cannot be written."""

    kind = "workdir error"


class NonFiniteError(UserError, FloatingPointError):
    """A NaN or infinity in a loss, a gradient, logits or weights: the run diverged."""

    kind = "non-finite"


def one_line(text: str) -> str:
    """Newlines and runs of blanks folded into single spaces."""
    return " ".join(str(text).split())


def die(message: str) -> None:
    """Prints `message` as one line on stderr and exits with EXIT_CODE."""
    print(one_line(message), file=sys.stderr, flush=True)
    sys.exit(EXIT_CODE)


def cli_main(main: Callable[..., Any]) -> Callable[..., Any]:
    """`main` with every expected failure turned into one stderr line and exit status 1."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            die(f"{e.kind}: {e}")
        except OSError as e:  # permission denied, no space left, missing file: names the path
            die(f"file system error: {e}")

    return wrapped


# ---------------------------------------------------------------------------------------------
# Writing results: check first, then write all or nothing


def check_writable(directory: str, what: str = "results") -> None:
    """Raises WorkdirError unless `directory` exists (or can be created) and takes a new file."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise WorkdirError(f"{directory} is not writable ({reason}); {what} could not be "
                           "saved there") from None


def atomic_write(path: str, text: str) -> None:
    """Writes `text` to `path` via a temporary file and a rename: readers see all or nothing."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

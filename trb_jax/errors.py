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
        app.run(cli_main(main), flags_parser=config_flags_parser)   # absl tools
        cli_main(main)()                                            # argparse tools
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from collections.abc import Callable, Sequence
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
    "config_flags_parser",
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


def _die(message: str) -> None:
    print(one_line(message), file=sys.stderr, flush=True)
    sys.exit(EXIT_CODE)


def cli_main(main: Callable[..., Any]) -> Callable[..., Any]:
    """`main` with every expected failure turned into one stderr line and exit status 1."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            _die(f"{e.kind}: {e}")
        except OSError as e:  # permission denied, no space left, missing file: names the path
            _die(f"file system error: {e}")

    return wrapped


# ---------------------------------------------------------------------------------------------
# absl + ml_collections flags: one line for a config that does not parse


_OVERRIDE = re.compile(r"^--(?P<flag>[A-Za-z_]\w*)\.(?P<path>[\w.]+)(=.*)?$")


def _config_value(argv: Sequence[str], flag: str):
    """The ConfigDict of `--flag=PATH[:ARG]` in argv, built again (None if it does not build)."""
    for arg in argv[1:]:
        if arg.startswith(f"--{flag}="):
            path, _, rest = arg.split("=", 1)[1].partition(":")
            try:
                from trb_jax.config import load_config_file

                return load_config_file(path, rest or None)
            except Exception:  # noqa: BLE001  (the file itself is broken: another message)
                return None
    return None


def _unknown_override(argv: Sequence[str]) -> str | None:
    """A message for the first `--config.a.b=...` whose field does not exist, else None."""
    configs: dict[str, Any] = {}
    for arg in argv[1:]:
        m = _OVERRIDE.match(arg)
        if not m:
            continue
        if m["flag"] not in configs:
            configs[m["flag"]] = _config_value(argv, m["flag"])
        cd = configs[m["flag"]]
        if cd is None:
            continue
        parts = m["path"].split(".")
        for i, part in enumerate(parts):
            keys = list(cd.keys()) if hasattr(cd, "keys") else []
            if part not in keys:
                field = ".".join(parts[:i + 1])
                close = difflib.get_close_matches(part, keys, n=1)
                hint = f"; did you mean '{'.'.join(parts[:i] + close)}'?" if close else ""
                return f"--{m['flag']}.{m['path']}: unknown config field '{field}'{hint}"
            cd = cd[part]
    return None


def _without_traceback(text: str) -> str:
    """"flag --config=...: Error whilst parsing config file: Traceback ... ValueError: msg" ->
    the text before the traceback and its last line."""
    head, sep, tail = str(text).partition("Traceback (most recent call last):")
    if not sep:
        return str(text)
    last = [line for line in tail.strip().splitlines() if line.strip()][-1].strip()
    return f"{head.strip()} {last}"


def config_flags_parser(argv: Sequence[str]) -> list[str]:
    """absl `flags_parser` for the CLIs: a flag or config that does not parse is one line.

    ml_collections raises plain exceptions (AttributeError for an unknown override, whatever the
    config file's get_config raises for a bad argument), which absl would print with a long
    traceback.
    """
    from absl import flags

    try:
        return flags.FLAGS(list(argv))
    except flags.Error as e:
        message = _unknown_override(argv) or _without_traceback(str(e))
        _die(f"config error: {message}")
    except Exception as e:  # noqa: BLE001  (ml_collections: AttributeError for an unknown field)
        message = _unknown_override(argv) or _without_traceback(f"{type(e).__name__}: {e}")
        _die(f"config error: {message}")
    return []  # unreachable


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

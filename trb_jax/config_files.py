"""Where a `--config=configs/NAME.py` file is: the working directory, the checkout, the install.

The configs live in `configs/` at the top of the repository and are installed with the package
as `trb_jax.configs` (pyproject.toml), so a command written for a checkout,
`python -m trb_jax.train --config=configs/toy.py ...`, also works after a non-editable
`pip install .` from any directory. Lookup order for a relative path under `configs/`:

1. the path itself, relative to the working directory (a user's own or edited copy wins);
2. `configs/` of the checkout this `trb_jax` was imported from (a repository root: it holds
   pyproject.toml);
3. the installed package `trb_jax.configs`.

A path found nowhere is returned unchanged, so the error names what the user typed.

`load_config_file` builds a file's ConfigDict; `config_flags_parser` is the CLIs' absl flags
parser, which reports a config that does not parse (or an override of a field that does not
exist) as one line. Kept free of heavy imports: the CLIs call `resolve_argv` before absl parses
the flags.
"""

from __future__ import annotations

import difflib
import importlib.resources
import importlib.util
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from trb_jax.errors import ConfigError, die

if TYPE_CHECKING:
    import ml_collections

__all__ = ["CONFIG_DIR", "resolve", "resolve_argv", "find", "load_config_file",
           "config_flags_parser"]

CONFIG_DIR = "configs"


def _checkout_dir() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ok = os.path.isfile(os.path.join(root, "pyproject.toml"))
    return os.path.join(root, CONFIG_DIR) if ok else None


def _package_dir() -> str | None:
    if importlib.util.find_spec("trb_jax.configs") is None:
        return None
    files = importlib.resources.files("trb_jax.configs")
    return str(files) if os.path.isdir(str(files)) else None  # an unpacked install


def find(relative: str) -> str | None:
    """configs/<relative> (e.g. "toy.py") of the checkout, else of the install; None if neither."""
    for base in (_checkout_dir(), _package_dir()):
        if base is not None and os.path.isfile(os.path.join(base, relative)):
            return os.path.join(base, relative)
    return None


def resolve(path: str) -> str:
    """`path` if it exists, else the checkout's or installed copy of a `configs/...` path."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) < 2 or parts[0] != CONFIG_DIR:
        return path
    found = find(os.path.join(*parts[1:]))
    return found if found is not None else path


def _resolve_flag_value(value: str) -> str:
    path, sep, arg = value.partition(":")  # config_flags: PATH[:ARG]
    return resolve(path) + sep + arg


def resolve_argv(argv: list[str]) -> list[str]:
    """argv with the value of `--config=PATH[:ARG]` / `--config PATH[:ARG]` resolved."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = "--config=" + _resolve_flag_value(a[len("--config="):])
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = _resolve_flag_value(out[i + 1])
    return out


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file (what --config=PATH[:ARG] does on the command line)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(
        "trb_config_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


# ---------------------------------------------------------------------------------------------
# absl + ml_collections flags: one line for a config that does not parse


_OVERRIDE = re.compile(r"^--(?P<flag>[A-Za-z_]\w*)\.(?P<path>[\w.]+)(=.*)?$")


def _config_value(argv: Sequence[str], flag: str):
    """The ConfigDict of `--flag=PATH[:ARG]` in argv, built again (None if it does not build)."""
    for arg in argv[1:]:
        if arg.startswith(f"--{flag}="):
            path, _, rest = arg.split("=", 1)[1].partition(":")
            try:
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
        die(f"config error: {message}")
    except Exception as e:  # noqa: BLE001  (ml_collections: AttributeError for an unknown field)
        message = _unknown_override(argv) or _without_traceback(f"{type(e).__name__}: {e}")
        die(f"config error: {message}")
    return []  # unreachable

"""Where a `--config=configs/NAME.py` file is: the working directory, the checkout, the install.

The configs live in `configs/` at the top of the repository and are installed with the package
as `trb_jax.configs` (pyproject.toml), so a command written for a checkout,
`python -m trb_jax.train --config=configs/toy.py ...`, also works after a non-editable
`pip install .` from any directory. Lookup order for a relative path under `configs/`:

1. the path itself, relative to the working directory (a user's own or edited copy wins);
2. `configs/` of the checkout this `trb_jax` was imported from (a repository root: it holds
   pyproject.toml);
3. the installed package `trb_jax.configs`.

A path found nowhere is returned unchanged, so the error names what the user typed. Kept free of
heavy imports: the CLIs call `resolve_argv` before absl parses the flags.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os

__all__ = ["CONFIG_DIR", "resolve", "resolve_argv", "find"]

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

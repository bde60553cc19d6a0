"""Metrics out of a run: DIR/<name>.jsonl (one JSON object per logged step) + TensorBoard.

Resuming from a checkpoint taken after update s rewinds the log: lines with step >= s (written
after that checkpoint, before the run died) are dropped, a torn last line included, and the
TensorBoard writer purges events at step >= s, so the files read as one uninterrupted run.
Non-finite numbers are written as JSON null (strict JSON) and skipped in TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["MetricWriter", "read_jsonl", "rewind_jsonl"]


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The complete records of a metrics file (a torn last line is ignored)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is also untrusted
    return records


def rewind_jsonl(path: str, step: int) -> int:
    """Keeps only the records with record["step"] < step; returns how many were kept."""
    kept = [r for r in read_jsonl(path) if r.get("step", -1) < step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return len(kept)


def _clean(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    return x if math.isfinite(x) else None


class MetricWriter:
    """Appends records to DIR/<name>.jsonl and scalars to TensorBoard under DIR/tensorboard.

    Only the primary process should create one (multi-host runs write once).
    """

    def __init__(self, directory: str, name: str = "metrics", *, resume_step: int | None = None,
                 tensorboard: bool = True):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"{name}.jsonl")
        if resume_step is not None:
            rewind_jsonl(self.path, resume_step)
        elif os.path.exists(self.path):
            os.remove(self.path)  # a fresh run in a reused directory starts a fresh log
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(directory, "tensorboard", name),
                                     purge_step=resume_step)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=int(step))
        return record

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

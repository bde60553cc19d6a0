"""Curves of training runs: reward / pass@1 against update, mean +- 95% CI over seeds.

Reads the files a run writes (metrics.jsonl, eval.jsonl); matplotlib with the Agg backend, so
it works on headless machines and in CI. `summarize` is the numeric part (tested on its own).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from trb_jax.metric_writer import read_jsonl

__all__ = ["series", "summarize", "ci95", "plot_curves"]


def series(workdir: str, key: str, file: str = "metrics") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` in WORKDIR/<file>.jsonl, skipping records without it."""
    records = [r for r in read_jsonl(os.path.join(workdir, f"{file}.jsonl"))
               if r.get(key) is not None]
    return (np.array([r["step"] for r in records]), np.array([r[key] for r in records], float))


def ci95(values_sn: np.ndarray) -> np.ndarray:
    """Half-width of the 95% Student-t interval of the mean over axis 0 (0 for one seed)."""
    from scipy import stats

    n = values_sn.shape[0]
    if n < 2:
        return np.zeros(values_sn.shape[1:])
    sem = values_sn.std(axis=0, ddof=1) / math.sqrt(n)
    return stats.t.ppf(0.975, n - 1) * sem


def summarize(workdirs: Sequence[str], key: str, file: str = "metrics", smooth: int = 1
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, ci95) over runs of `key`, on the steps every run logged; `smooth` > 1
    averages each run over a trailing window of that many logged points first."""
    runs = [series(w, key, file) for w in workdirs]
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in runs)))
    values = []
    for steps, v in runs:
        if smooth > 1:
            kernel = np.ones(smooth)
            v = np.convolve(v, kernel, "full")[:len(v)] / np.convolve(np.ones_like(v), kernel,
                                                                     "full")[:len(v)]
        index = {int(s): i for i, s in enumerate(steps)}
        values.append([v[index[s]] for s in common])
    values_sn = np.array(values, float)
    return np.array(common), values_sn.mean(axis=0), ci95(values_sn)


def plot_curves(groups: Mapping[str, Sequence[str]], panels: Sequence[tuple[str, str, str]],
                path: str, *, smooth: int = 1, title: str = "") -> str:
    """One panel per (key, file, label); one line (mean) and band (95% CI) per group of runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (key, file, label) in zip(axes[0], panels):
        for name, workdirs in groups.items():
            steps, mean, half = summarize(workdirs, key, file, smooth if file == "metrics" else 1)
            line, = ax.plot(steps, mean, label=f"{name} (n={len(workdirs)})")
            if len(workdirs) > 1:
                ax.fill_between(steps, mean - half, mean + half, alpha=0.2,
                                color=line.get_color())
        ax.set_xlabel("update")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Curves over seeds: means, 95% t intervals, the PNG, and the main job's table."""

import numpy as np
import pytest
from scipy import stats

from trb_jax import plotting
from trb_jax.metric_writer import MetricWriter
from trb_jax.toy import demo


def _run(tmp_path, name, rewards, passes):
    w = MetricWriter(str(tmp_path / name), tensorboard=False)
    for k, r in enumerate(rewards):
        w.write(k, {"reward": r, "teacher_logprob": -1.0 - k})
    w.close()
    e = MetricWriter(str(tmp_path / name), "eval", tensorboard=False)
    for step, p in passes:
        e.write(step, {"toy/pass@1": p})
    e.close()
    return str(tmp_path / name)


def test_ci95_is_the_student_t_interval():
    values = np.array([[0.1, 1.0], [0.3, 2.0], [0.2, 4.0], [0.5, 3.0]])
    half = plotting.ci95(values)
    for j in range(2):
        lo, hi = stats.t.interval(0.95, 3, loc=values[:, j].mean(), scale=stats.sem(values[:, j]))
        assert half[j] == pytest.approx((hi - lo) / 2)
    assert np.all(plotting.ci95(values[:1]) == 0)


def test_summarize_uses_common_steps_and_smooths(tmp_path):
    a = _run(tmp_path, "a", [0.0, 1.0, 2.0, 3.0], [(0, 0.1), (4, 0.3)])
    b = _run(tmp_path, "b", [1.0, 1.0, 1.0], [(0, 0.2), (4, 0.5)])
    steps, mean, _ = plotting.summarize([a, b], "reward")
    np.testing.assert_array_equal(steps, [0, 1, 2])
    np.testing.assert_allclose(mean, [0.5, 1.0, 1.5])
    steps, mean, _ = plotting.summarize([a], "reward", smooth=2)
    np.testing.assert_allclose(mean, [0.0, 0.5, 1.5, 2.5])  # trailing means
    steps, mean, half = plotting.summarize([a, b], "toy/pass@1", "eval")
    np.testing.assert_allclose(mean, [0.15, 0.4])
    assert np.all(half > 0)


def test_plot_and_demo_table(tmp_path):
    a = _run(tmp_path, "vanilla", [0.1] * 12, [(0, 0.1), (12, 0.2)])
    b = _run(tmp_path, "trb", [0.2] * 12, [(0, 0.1), (12, 0.3)])
    png = plotting.plot_curves({"vanilla": [a], "trb": [b]},
                               [("reward", "metrics", "reward"), ("toy/pass@1", "eval", "pass@1")],
                               str(tmp_path / "out" / "p.png"), smooth=3, title="t")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = demo.table({"vanilla": a, "trb": b}).splitlines()
    assert table[2] == "| vanilla | 0.100 | 0.200 | 0.100 | 0.100 | -5.500 |"
    assert table[3] == "| trb | 0.100 | 0.300 | 0.200 | 0.200 | -5.500 |"

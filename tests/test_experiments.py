"""The reproduction scripts' summary tables and rules (experiments/final_eval.py,
methods_seeds.py, verdicts.py): means, 95% t intervals, differences to vanilla paired by seed,
checked against scipy."""

import os
import sys

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
import final_eval  # noqa: E402


def _entry(group, seed, p):
    return {"group": group, "seed": seed, "pass@1": p}


def _row(table, group):
    return next(line for line in table.splitlines() if line.startswith(f"| {group} |"))


def test_table_pairs_by_seed_and_uses_the_t_interval():
    vanilla = [0.20, 0.25, 0.22]
    trb = [0.26, 0.24, 0.29]
    results = {f"methods/vanilla_seed{s}": _entry("vanilla", s, p) for s, p in enumerate(vanilla)}
    # seeds listed out of order: pairing must go by seed, not by position
    for s in (2, 0, 1):
        results[f"methods/trb_seed{s}"] = _entry("trb", s, trb[s])
    row = _row(final_eval.table(results), "trb")
    diffs = [t - v for t, v in zip(trb, vanilla)]
    lo, hi = stats.t.interval(0.95, 2, loc=sum(diffs) / 3, scale=stats.sem(diffs))
    mean_lo, mean_hi = stats.t.interval(0.95, 2, loc=sum(trb) / 3, scale=stats.sem(trb))
    assert f"{sum(trb) / 3:.3f} +- {(mean_hi - mean_lo) / 2:.3f}" in row
    assert f"{sum(diffs) / 3:+.3f} +- {(hi - lo) / 2:.3f} (n=3)" in row
    assert _row(final_eval.table(results), "vanilla").endswith("|  |")


def test_single_runs_get_no_interval_and_pair_with_the_given_base():
    results = {"eps/eps0.3_seed0": _entry("trb eps0=0.3", 0, 0.30)}
    row = _row(final_eval.table(results, base={0: 0.25}), "trb eps0=0.3")
    assert row == "| trb eps0=0.3 | 1 | 0.300 | +0.050 (n=1) |"
    assert "+-" not in row


@pytest.mark.parametrize("n", [2, 5])
def test_interval_matches_scipy(n):
    v = np.linspace(0.1, 0.3, n) ** 2
    lo, hi = stats.t.interval(0.95, n - 1, loc=v.mean(), scale=stats.sem(v))
    assert final_eval.interval(v) == f" +- {(hi - lo) / 2:.3f}"


def test_topk_support_ablation_pairs_by_seed_with_the_t_interval():
    import topk_support

    a = np.array([0.25, 0.26, 0.27, 0.24, 0.28])
    b = a + np.array([0.01, 0.0, 0.02, -0.01, 0.01])
    out = topk_support.paired(a, b)
    d = b - a
    lo, hi = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d))
    assert out["mean_diff"] == pytest.approx(d.mean())
    assert out["ci95"] == pytest.approx((hi - lo) / 2)
    assert (out["wins"], out["losses"], out["n"]) == (3, 1, 5)


@pytest.fixture
def world_reset():
    import common

    yield common
    common.set_world("default")


@pytest.mark.parametrize("script", ["methods_seeds", "eps_sweep", "prefix_probe", "final_eval",
                                    "tune_lr", "time_run", "verdicts"])
def test_every_script_runs_on_the_hard_world_in_its_own_folders(script, world_reset, capsys):
    """--world hard --dry-run: the plan names the hard world's config (its shipped student,
    240-token rollouts) and separate run / result / figure folders; the default is unchanged."""
    import importlib
    import json

    common = world_reset
    module = importlib.import_module(script)
    module.main(["--dry-run"])
    default = json.loads(capsys.readouterr().out)
    module.main(["--world", "hard", "--dry-run"])
    hard = json.loads(capsys.readouterr().out)
    assert default["world"] == "default" and hard["world"] == "hard"
    assert default["out"].endswith(os.path.join("runs", "experiments"))
    assert hard["out"].endswith(os.path.join("runs", "experiments_hard"))
    sep = os.sep
    assert f"{sep}experiments{sep}results{sep}" in default["results"]
    assert f"{sep}experiments{sep}results_hard{sep}" in hard["results"]
    if "figure" in hard:
        assert f"{sep}img{sep}hard{sep}" in hard["figure"]
        assert f"{sep}img{sep}hard{sep}" not in default["figure"]
    if "max_new_tokens" in hard:
        assert (default["max_new_tokens"], hard["max_new_tokens"]) == (48, 240)
    if "student" in hard:
        assert "assets_hard" in hard["student"] and "assets_hard" not in default["student"]
    if "runs" in hard:
        assert hard["runs"] == default["runs"]  # the same plan, in another folder
    common.set_world("hard")
    cfg = common.toy_config("vanilla", 1)
    assert cfg.rollout.max_new_tokens == cfg.eval.max_new_tokens == 240
    assert "assets_hard" in cfg.data.source and cfg.rollout.prompt_length == 128


def test_methods_row_averages_seeds_per_update_and_uses_the_t_interval():
    import methods_seeds

    runs = [{"pass@1": {0: 0.1, 25: 0.2, 50: 0.4}, "final_pass@1": 0.4,
             "teacher_logprob_warmup": -0.5},
            {"pass@1": {0: 0.2, 25: 0.3, 50: 0.6}, "final_pass@1": 0.6,
             "teacher_logprob_warmup": -0.3},
            {"pass@1": {0: 0.3, 50: 0.8}, "final_pass@1": 0.8,  # missed update 25
             "teacher_logprob_warmup": -0.1}]
    row = methods_seeds.method_row(runs)
    assert row["periodic_pass@1_by_update"] == pytest.approx({0: 0.2, 50: 0.6})
    assert row["mean"] == pytest.approx(0.6) and row["n"] == 3
    assert row["teacher_logprob_warmup"] == pytest.approx(-0.3)
    lo, hi = stats.t.interval(0.95, 2, loc=0.6, scale=stats.sem([0.4, 0.6, 0.8]))
    assert row["ci95"] == pytest.approx((hi - lo) / 2)


# ------------------------------------------------ the pre-registered rules (experiments/verdicts.py)

@pytest.mark.parametrize("diffs, verdict", [
    ([0.02, 0.03, 0.01, 0.025, 0.015], "win"),
    ([-0.02, -0.03, -0.01, -0.025, -0.015], "loss"),
    ([0.05, 0.05, 0.05, 0.05, -0.15], "inconclusive"),  # 4/5 positive, interval holds 0
    ([0.02, 0.03, 0.01, -0.0001, -0.0001], "inconclusive"),  # only 3/5 positive
])
def test_paired_rule_needs_the_interval_and_four_of_five(diffs, verdict):
    import verdicts

    d = np.array(diffs)
    out = verdicts.paired_rule(d)
    lo, hi = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d))
    assert (out["low"], out["high"]) == pytest.approx((lo, hi))
    assert out["verdict"] == verdict


def test_exploratory_rows_pair_every_other_method_with_vanilla_and_skip_unpaired():
    import verdicts

    final = {"base_student": {"group": "base", "seed": 0, "pass@1": 0.1}}
    for s, (v, t, k) in enumerate([(0.70, 0.66, 0.72), (0.71, 0.72, 0.74), (0.72, 0.70, 0.75)]):
        final[f"methods/vanilla_seed{s}"] = {"group": "vanilla", "seed": s, "pass@1": v}
        final[f"methods/trb_seed{s}"] = {"group": "trb", "seed": s, "pass@1": t}
        final[f"methods/skd_seed{s}"] = {"group": "skd", "seed": s, "pass@1": k}
    final["methods/veto_seed1"] = {"group": "veto", "seed": 1, "pass@1": 0.9}  # one seed only
    final["eps/eps0.3_seed0"] = {"group": "trb eps0=0.3", "seed": 0, "pass@1": 0.9}
    rows = verdicts.exploratory(final)
    assert list(rows) == ["skd final pass@1, skd - vanilla"]  # trb is H1's; veto has no pair
    skd = rows["skd final pass@1, skd - vanilla"]
    assert skd["diffs"] == pytest.approx([0.02, 0.03, 0.03])
    assert (skd["positive"], skd["seeds"], skd["skd"]) == (3, [0, 1, 2], [0.72, 0.74, 0.75])
    # H1 reads the same pairs for trb
    assert verdicts.h1(final)["diffs"] == pytest.approx([-0.04, 0.01, -0.02])


def test_auroc_rule_skips_undefined_levels_and_needs_the_end_points():
    import verdicts

    levels = lambda au: {"diagnostics": [{"eps": e, "auroc": a} for e, a in  # noqa: E731
                                         zip((0.0, 0.01, 0.03, 0.1, 0.3, 1.0), au)]}
    falling = verdicts.h2b(levels([0.9, 0.8, float("nan"), 0.7, 0.6, 0.5]))
    assert falling["verdict"] == "supported" and falling["eps"] == [0.0, 0.01, 0.1, 0.3, 1.0]
    assert falling["spearman"] == pytest.approx(-1.0)
    assert verdicts.h2b(levels([0.6, 0.65, 0.7, 0.75, 0.8, 0.9]))["verdict"] == "contradicted"
    assert verdicts.h2b(levels([0.6, 0.8, 0.6, 0.8, 0.6, 0.8]))["verdict"] == "inconclusive"


def test_prefix_rule_reports_when_both_rules_fire():
    import verdicts

    def probe(gains):
        return {"lengths": {str(t): {"relative_gain/student": g, "relative_gain/teacher": 0.0}
                            for t, g in zip((25, 43, 61, 79, 115), gains)}}

    assert verdicts.h3(probe([0.1, 0.2, 0.3, 0.4, 0.5]))["verdict"] == "supported"
    assert verdicts.h3(probe([0.5, 0.4, 0.3, 0.2, 0.1]))["verdict"] == "contradicted"
    assert verdicts.h3(probe([-0.5, -0.4, -0.3, -0.2, -0.1]))["verdict"] == (
        "both rules fire: inconclusive")
    assert verdicts.h3(probe([0.3, 0.1, 0.5, 0.2, 0.4]))["verdict"] == "inconclusive"


def test_prefix_probe_figure_from_its_results_file(tmp_path):
    import prefix_probe

    rows = {str(t): {"trb/student": 0.1 + t / 1000, "vanilla/student": 0.1, "trb/teacher": 0.5,
                     "vanilla/teacher": 0.4, "relative_gain/student": t / 1000,
                     "relative_gain/teacher": 0.25} for t in (25, 43, 115)}
    png = tmp_path / "img" / "probe.png"
    prefix_probe.plot({"eps0": 0.1, "problems": 4, "continuations": 2, "lengths": rows}, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_claim_left_by_a_dead_process_is_taken_over(tmp_path):
    import subprocess

    import common

    path = str(tmp_path / ".claim")
    fd = common.claim(path)
    assert fd is not None and open(path).read() == str(os.getpid())
    assert common.claim(path) is None  # held by a live process (this one)
    os.close(fd)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    with open(path, "w") as f:
        f.write(str(gone.pid))
    fd = common.claim(path)
    assert fd is not None and open(path).read() == str(os.getpid())
    os.close(fd)
    with open(path, "w") as f:  # empty and fresh: its creator is writing it
        f.write("")
    assert common.claim(path) is None
    os.utime(path, (0, 0))  # empty and old: abandoned
    fd = common.claim(path)
    assert fd is not None
    os.close(fd)

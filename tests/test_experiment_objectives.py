"""experiments/objectives.py in a small mode: two arms, one seed, two updates on the toy world.

Checks the script end to end (runs, summary, paired table, plots) and that a re-run skips the
finished runs; the numbers themselves come from the full run documented in docs/results.md.
"""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
import objectives as experiment  # noqa: E402

SMALL = ["--override", "train.num_steps=2", "--override", "rollout.prompts_per_step=2",
         "--override", "eval.datasets.toy_test.max_examples=4", "--override", "train.eval_every=0",
         "--override", "train.checkpoint_every=0", "--override", "rollout.max_new_tokens=8",
         "--override", "eval.max_new_tokens=8", "--override", "rollout.samples_per_prompt=1"]


def test_small_run_writes_the_paired_table_and_plots(tmp_path):
    args = ["--arms", "vanilla,tropd", "--seeds", "1", "--variant-seeds", "0",
            "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "objectives.json"),
            "--plots", str(tmp_path / "img"), *SMALL]
    results = experiment.main(args)
    assert set(results) == {"vanilla/seed0", "tropd/seed0", "table"}
    tropd = results["tropd/seed0"]
    assert 0.0 <= tropd["trust_share_mean"] <= 1.0 and tropd["grad_norm_mean"] > 0
    assert results["vanilla/seed0"]["trust_share_mean"] is None  # opd logs no trust region
    diff = results["table"]["paired"]["tropd - vanilla"]["final_pass@1"]
    assert diff["n"] == 1 and diff["mean_diff"] == pytest.approx(
        tropd["final_pass@1"] - results["vanilla/seed0"]["final_pass@1"])
    # (one seed: the intervals are NaN, which JSON keeps and == does not)
    assert json.dumps(json.load(open(tmp_path / "objectives.json"))["table"]) == json.dumps(results["table"])
    for name in ("objectives.png", "objectives_diagnostics.png", "objectives_trust_region.png"):
        assert (tmp_path / "img" / name).stat().st_size > 0
    # a re-run trains nothing: every run is finished
    mtime = os.path.getmtime(tmp_path / "runs" / "objectives" / "tropd_seed0" / "metrics.jsonl")
    experiment.main(args)
    assert os.path.getmtime(tmp_path / "runs" / "objectives" / "tropd_seed0" / "metrics.jsonl") == mtime

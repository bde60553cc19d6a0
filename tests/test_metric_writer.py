"""metrics.jsonl / TensorBoard writer: strict JSON, resume rewinds (torn lines included)."""

import json
import math
import os

from trb_jax.metric_writer import MetricWriter, read_jsonl, rewind_jsonl


def test_records_are_strict_json_with_step_and_nulls(tmp_path):
    w = MetricWriter(str(tmp_path), tensorboard=False)
    w.write(0, {"loss": 1.5, "auroc": float("nan"), "kl": float("inf"), "behavior": "trb",
                "n": 3})
    w.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    record = json.loads(line)  # strict: NaN/Infinity would not be valid JSON
    assert "NaN" not in line and "Infinity" not in line
    assert record == {"step": 0, "loss": 1.5, "auroc": None, "kl": None, "behavior": "trb", "n": 3}


def test_resume_rewinds_lines_at_or_after_the_checkpoint(tmp_path):
    w = MetricWriter(str(tmp_path), tensorboard=False)
    for k in range(6):
        w.write(k, {"loss": float(k)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # torn by a kill mid-write
    assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == list(range(6))
    w = MetricWriter(str(tmp_path), resume_step=4, tensorboard=False)
    w.write(4, {"loss": 40.0})
    w.close()
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["loss"]) for r in records] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0),
                                                          (4, 40.0)]


def test_fresh_run_in_a_reused_directory_starts_a_fresh_log(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 9}\n')
    w = MetricWriter(str(tmp_path), tensorboard=False)
    w.write(0, {"loss": 1.0})
    w.close()
    assert read_jsonl(str(tmp_path / "metrics.jsonl")) == [{"step": 0, "loss": 1.0}]


def test_rewind_returns_the_kept_count(tmp_path):
    path = str(tmp_path / "m.jsonl")
    with open(path, "w") as f:
        for k in range(5):
            f.write(json.dumps({"step": k}) + "\n")
    assert rewind_jsonl(path, 3) == 3
    assert rewind_jsonl(path, 10) == 3


def test_tensorboard_events_hold_the_scalars(tmp_path):
    from tensorboardX.event_file_writer import EventFileWriter  # noqa: F401 (installed)
    from tensorboard_reader import scalars

    w = MetricWriter(str(tmp_path))
    w.write(0, {"loss": 2.0, "behavior": "trb", "auroc": math.nan})
    w.write(1, {"loss": 1.0})
    w.close()
    events = scalars(str(tmp_path / "tensorboard" / "metrics"))
    assert events["loss"] == [(0, 2.0), (1, 1.0)]
    assert "behavior" not in events and "auroc" not in events

"""The training loop end to end on the smoke world: every method, resume after kill -9, eval."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from trb_jax import config as C
from trb_jax import methods, objectives, smoke, trainer
from trb_jax import train_step as ts
from trb_jax.metric_writer import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("time_rollout_s", "time_update_s", "time_scoring_s", "tokens_per_s",
               "rollout_tokens_per_s")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return str(smoke.make_smoke_world(tmp_path_factory.mktemp("smoke_world")))


def _config(world, method, **train):
    cd = C.base_config()
    cd.model.student, cd.model.teacher = f"{world}/student", f"{world}/teacher"
    cd.data.source = f"{world}/train.jsonl"
    cd.data.system_prompt = "Put the answer in \\boxed{}."
    cd.rollout.prompts_per_step, cd.rollout.samples_per_prompt = 2, 2
    cd.rollout.max_new_tokens = 8
    cd.rollout.prompt_length = 64
    cd.method.name = method
    cd.method.warmup_steps, cd.method.sft_steps, cd.method.eps0 = 2, 1, 0.05
    cd.optim.peak_lr, cd.optim.decay_steps = 1e-3, 4
    cd.train.num_steps, cd.train.checkpoint_every, cd.train.chunk_size = 3, 2, 4
    cd.train.progress_bar = False
    cd.train.grader_workers = 1
    cd.eval.datasets.toy = dict(source=f"{world}/test.jsonl", max_examples=2)
    cd.eval.num_samples, cd.eval.max_new_tokens = 1, 8
    for key, value in train.items():
        cd.train[key] = value
    return C.to_run_config(cd)


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_method_trains_end_to_end(world, tmp_path, method):
    cfg = _config(world, method)
    records = trainer.train(cfg, str(tmp_path))
    total = methods.total_updates(cfg.method, cfg.train.num_steps)
    assert [r["step"] for r in records] == list(range(total))
    assert read_jsonl(str(tmp_path / "metrics.jsonl")) == records
    for r, k in zip(records, range(total)):
        plan = methods.plan_step(k, cfg.method)
        assert (r["behavior"], r["objective"]) == (plan.behavior, plan.objective_name("opd"))
        assert np.isfinite(r["loss"]) and r["loss"] >= -1e-6
        assert 0.0 <= r["reward"] <= 1.0
        assert np.isfinite(r["teacher_logprob"]) and r["teacher_logprob"] <= 0
        assert np.isfinite(r["teacher_entropy"]) and r["teacher_entropy"] >= 0
        assert r["eps"] == pytest.approx(plan.eps)
        for key in TIMING_KEYS:
            assert r[key] > 0
        if plan.behavior in ("trb", "fixed_eps"):
            assert 0.0 <= r["beta_p10"] <= r["beta_p50"] <= r["beta_p90"] <= 1.0
            assert r["behavior_kl"] <= plan.eps * (1 + 1e-3) + 1e-6
    evals = read_jsonl(str(tmp_path / "eval.jsonl"))
    assert [e["step"] for e in evals] == [0, total]
    assert all(0.0 <= e["toy/pass@1"] <= 1.0 for e in evals)
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps[-1] == total
    assert os.listdir(tmp_path / "tensorboard" / "metrics")


PAIRS = [(m, o) for m in sorted(methods.METHODS) for o in objectives.names() if o != "opd"]


@pytest.mark.parametrize("method,objective", PAIRS)
def test_every_method_trains_with_every_objective(world, tmp_path, method, objective):
    """Method (behavior schedule) and objective are independent axes: every pair runs two
    updates (one in the method's warmup, when it has one) with finite metrics and moves the
    student. (objective=opd with every method: test_every_method_trains_end_to_end.)"""
    cfg = _config(world, method, num_steps=2, checkpoint_every=0)
    cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, name=objective),
                              method=dataclasses.replace(cfg.method, sft_steps=1),
                              eval=dataclasses.replace(cfg.eval, datasets=()))
    records = trainer.train(cfg, str(tmp_path))
    total = methods.total_updates(cfg.method, cfg.train.num_steps)
    assert [r["step"] for r in records] == list(range(total))
    for r, k in zip(records, range(total)):
        plan = methods.plan_step(k, cfg.method)
        assert r["objective"] == plan.objective_name(objective)
        assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        if r["objective"] == "tropd":
            assert 0.0 <= r["trust_share"] <= 1.0 and np.isfinite(r["k1"])
        assert np.isfinite(r["student_entropy"]) and r["student_entropy"] >= 0


@pytest.mark.parametrize("objective", ["opd", "tropd"])
def test_trb_warmup_reuses_rollout_teacher_scores(world, tmp_path, objective):
    """During TRB warmup the batch carries the rollout's teacher scores at exactly the supports
    the objective declares (no second teacher pass); after warmup the teacher scores the batch
    in the step."""
    cfg = _config(world, "trb")
    cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, name=objective))
    run_plan = [methods.plan_step(k, cfg.method) for k in range(3)]
    seen = []
    original = trainer.make_batch

    def spy(prompts, ro, plan, config):
        batch = original(prompts, ro, plan, config)
        stored = tuple(sorted(f for fields in ts.STORED_FIELDS.values() for f in fields
                              if getattr(batch, f) is not None))
        seen.append((plan.behavior, stored, batch.teacher_input_ids_bs is not None))
        return batch

    trainer.make_batch = spy
    try:
        trainer.train(cfg, str(tmp_path))
    finally:
        trainer.make_batch = original
    want = {"opd": ("topk_ids_btk", "topk_teacher_logprob_btk"),
            "tropd": ("sampled_teacher_logprob_bt", "teacher_topk_ids_btk", "teacher_topk_logprob_btk")}
    assert [p.behavior for p in run_plan] == ["trb", "trb", "student"]
    assert seen == [("trb", want[objective], False)] * 2 + [("student", (), True)]


def test_student_teacher_vocabulary_mismatch_is_a_config_error(world, tmp_path):
    from trb_jax.models import checkpoint, qwen3
    import jax

    bigger = dataclasses.replace(smoke.SMOKE_TEACHER, vocab_size=smoke.SMOKE_TEACHER.vocab_size + 8)
    params = qwen3.init_params(bigger, jax.random.key(0))
    checkpoint.save_pretrained(qwen3.Qwen3CausalLM(params=params, config=bigger), tmp_path / "t")
    model = C.ModelConfig(student=f"{world}/student", teacher=str(tmp_path / "t"),
                          teacher_tokenizer=f"{world}/teacher")
    with pytest.raises(C.ConfigError) as e:
        trainer.load_models(model)
    assert str(e.value) == ("model.teacher: vocabulary mismatch: student vocab_size 128 vs "
                            "teacher vocab_size 136 (OPD needs a shared vocabulary)")


def _teacher_placement_check():
    """8 fake devices, mesh (fsdp 2, tensor 4): load_models reads the teacher by the inference
    rules (embed replicated, heads / MLP / vocab over tensor) and the student by the training
    rules, straight into their shards."""
    import math

    import jax
    from jax.sharding import PartitionSpec as P

    from trb_jax import sharding

    world = os.environ["TRB_TEST_SMOKE_WORLD"]
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    model = C.ModelConfig(student=f"{world}/student", teacher=f"{world}/teacher",
                          compute_dtype="bfloat16", teacher_dtype="bfloat16")
    models = trainer.load_models(model, mesh=mesh)

    def expected(config, rules, itemsize):
        shapes = jax.tree.leaves(jax.eval_shape(lambda: trainer.qwen3.init_params(config, jax.random.key(0))))
        axes = jax.tree.leaves(trainer.qwen3.param_logical_axes(config),
                               is_leaf=lambda x: isinstance(x, tuple))
        total = 0
        for ax, x in zip(axes, shapes):
            spec = sharding.logical_to_spec(ax, x.shape, dict(mesh.shape), rules)
            split = math.prod(mesh.shape[a] for e in spec if e for a in ((e,) if isinstance(e, str) else e))
            total += math.prod(x.shape) // split * itemsize
        return total

    t_bytes = sharding.per_device_bytes(models.params_t)
    want_t = expected(models.config_t, sharding.INFERENCE_AXIS_RULES, 2)
    assert len(t_bytes) == 8 and set(t_bytes.values()) == {want_t}, (t_bytes, want_t)
    assert want_t > expected(models.config_t, sharding.LOGICAL_AXIS_RULES, 2)  # embed not split
    assert models.params_t["layers"]["gate_df"].sharding.spec == P(None, None, "tensor")
    assert models.params_t["layers"]["gate_df"].dtype == "bfloat16"
    assert models.config_t.compute_dtype == models.config_s.compute_dtype == "bfloat16"
    s_bytes = sharding.per_device_bytes(models.params_s)
    assert set(s_bytes.values()) == {expected(models.config_s, sharding.LOGICAL_AXIS_RULES, 4)}
    assert models.params_s["layers"]["gate_df"].sharding.spec == P(None, "fsdp", "tensor")
    print(f"TEACHER_PLACEMENT_OK teacher {want_t} B per device")


def test_teacher_is_loaded_sharded_by_the_inference_rules_on_8_devices(world, monkeypatch):
    from fake_devices import run_on_fake_devices

    monkeypatch.setenv("TRB_TEST_SMOKE_WORLD", world)
    run_on_fake_devices("test_trainer", "_teacher_placement_check", "TEACHER_PLACEMENT_OK")


def _cli(module, workdir, *overrides, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    return [sys.executable, "-m", module, "--config=configs/smoke.py", f"--workdir={workdir}",
            *overrides], env


def _deterministic(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    overrides = ("--config.train.num_steps=8", "--config.train.checkpoint_every=2",
                 "--config.train.eval_every=4", "--config.method.warmup_steps=4",
                 "--config.train.progress_bar=false")
    cache = {}  # subprocesses inherit conftest's persistent compilation cache
    full, killed = tmp_path / "full", tmp_path / "killed"
    cmd, env = _cli("trb_jax.train", full, *overrides, env_extra=cache)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)

    # SIGKILL right after update 5 is logged: checkpoint 4 exists, update 5's is never written,
    # so the resumed run must rewind metrics.jsonl to step 4 and redo updates 4 and 5.
    cmd, env = _cli("trb_jax.train", killed, *overrides,
                    env_extra={**cache, trainer.FAULT_ENV: "5"})
    # Output to a file, not a pipe: the killed trainer's orphaned grader workers inherit its
    # stdout/stderr, and a pipe would stay open until they notice their parent is gone.
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=log, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    partial = read_jsonl(str(killed / "metrics.jsonl"))
    assert [r["step"] for r in partial] == list(range(6))
    assert max(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit()) == 4

    cmd, env = _cli("trb_jax.train", killed, *overrides, env_extra=cache)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    a = read_jsonl(str(full / "metrics.jsonl"))
    b = read_jsonl(str(killed / "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(8))
    assert _deterministic(a) == _deterministic(b)
    assert read_jsonl(str(full / "eval.jsonl")) == read_jsonl(str(killed / "eval.jsonl"))

    cmd, env = _cli("trb_jax.evaluate", killed, "--config.eval.num_samples=2", env_extra=cache)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.load(open(killed / "eval_step_8.json"))
    toy = result["datasets"]["toy"]
    assert np.array(toy["correct_pn"]).shape == (8, 2)
    assert toy["metrics"]["pass@1"] == pytest.approx(np.mean(toy["correct_pn"]))


# ------------------------------------------------------------------ failures and recovery

from trb_jax import checkpointing, errors, locking  # noqa: E402


class _ModelsLoaded(Exception):
    pass


def _no_models(monkeypatch):
    """Makes loading the weights fail loudly: a check that must come first is tested."""
    def load(*args, **kwargs):
        raise _ModelsLoaded
    monkeypatch.setattr(trainer, "load_models", load)


def test_second_trainer_on_a_locked_workdir_refuses(world, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    with locking.WorkdirLock(str(tmp_path)):
        with pytest.raises(errors.WorkdirError, match=rf"^{tmp_path} is in use by another "
                                                      rf"trainer: pid {os.getpid()} on host "):
            trainer.train(_config(world, "vanilla"), str(tmp_path))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'  # untouched


def test_missing_student_dir_is_named(world, tmp_path):
    cfg = _config(world, "vanilla")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                             student=str(tmp_path / "nope")))
    with pytest.raises(errors.CheckpointError, match=rf"^model.student: checkpoint directory "
                                                     rf"{tmp_path}/nope does not exist$"):
        trainer.train(cfg, str(tmp_path / "w"))


def test_nan_weights_are_refused_at_load(world, tmp_path):
    import jax
    import jax.numpy as jnp

    from trb_jax.models import checkpoint, qwen3

    params = qwen3.init_params(smoke.SMOKE_STUDENT, jax.random.key(0))
    params["final_norm_d"] = params["final_norm_d"].at[0].set(jnp.nan)
    checkpoint.save_pretrained(qwen3.Qwen3CausalLM(params=params, config=smoke.SMOKE_STUDENT),
                               tmp_path / "s")
    model = C.ModelConfig(student=str(tmp_path / "s"), teacher=f"{world}/teacher",
                          student_tokenizer=f"{world}/student")
    with pytest.raises(errors.NonFiniteError, match=rf"^model.student: the checkpoint "
                                                    rf"{tmp_path}/s has NaN/inf weights in 1 "
                                                    r"tensor\(s\), first \['final_norm_d'\]$"):
        trainer.load_models(model)


def _with_data(cfg, path, **data):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=str(path), **data))


def test_bad_record_stops_the_run_before_models_load(world, tmp_path, monkeypatch):
    _no_models(monkeypatch)
    rows = open(f"{world}/train.jsonl").read().splitlines()
    rows[5] = json.dumps({**json.loads(rows[5]), "answer": None})
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(errors.DataError, match=rf"^{tmp_path}/d.jsonl:6 \(record 5\): field "
                                               r"'answer' is null"):
        trainer.train(_with_data(_config(world, "vanilla"), tmp_path / "d.jsonl"),
                      str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()  # nothing written: the run never started


def test_overlong_prompt_dropped_and_reported_before_models_load(world, tmp_path, monkeypatch,
                                                                 capfd):
    _no_models(monkeypatch)
    rows = open(f"{world}/train.jsonl").read().splitlines()
    rows[3] = json.dumps({**json.loads(rows[3]), "problem": "1 + " * 40 + "1"})
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    cfg = _with_data(_config(world, "vanilla"), tmp_path / "d.jsonl")
    with pytest.raises(_ModelsLoaded):  # the data passed: the run would go on without record 3
        trainer.train(cfg, str(tmp_path / "w"))
    where = f"{tmp_path}/d.jsonl:4 (record 3)"
    assert (f"data: dropped 1 of {len(rows)} prompts longer than 64 tokens "
            f"(data.overlong='drop'), first {where}") in capfd.readouterr().err
    report = json.load(open(tmp_path / "w" / "data_report.json"))
    assert report["dropped"] == [where] and report["records"] == len(rows)
    with pytest.raises(errors.DataError, match=r"^1 prompt\(s\) longer than "
                                               r"rollout.prompt_length=64: .*d.jsonl:4"):
        trainer.train(_with_data(cfg, tmp_path / "d.jsonl", overlong="error"),
                      str(tmp_path / "w2"))


def test_rows_must_split_over_the_data_parallel_devices():
    trainer.check_rows_divide(8, {"data": 4, "fsdp": 1, "tensor": 1}, "rows")
    trainer.check_rows_divide(3, {"data": 1, "fsdp": 1, "tensor": 4}, "rows")
    with pytest.raises(errors.ConfigError, match=r"^rollout.prompts_per_step x rollout."
                                                 r"samples_per_prompt: 3 rows per update do not "
                                                 r"split over the 4 data-parallel devices "
                                                 r"\(mesh dataxfsdp\)"):
        trainer.check_rows_divide(3, {"data": 2, "fsdp": 2, "tensor": 1},
                                  "rollout.prompts_per_step x rollout.samples_per_prompt")


def test_nonfinite_rollout_logprobs_are_caught_on_the_host():
    mask = np.array([[True, True, False]])
    ok = {"response_mask_bt": mask, "student_logprob_bt": np.array([[-1.0, -np.inf, np.nan]]),
          "behavior_logprob_bt": np.array([[-1.0, -2.0, np.nan]])}
    assert trainer.check_rollout_finite(ok) is None  # -inf is legitimate, masked NaN ignored
    for bad in (np.nan, np.inf):
        ro = dict(ok, student_logprob_bt=np.array([[bad, -1.0, 0.0]]))
        assert trainer.check_rollout_finite(ro) == (
            "the student log-probs of 1 of 2 sampled tokens are NaN/+inf (first in row 0): the "
            "models' logits are not finite")


def test_diverged_run_stops_naming_the_update(world, tmp_path):
    """peak_lr = 1e30: update 0 blows the weights up; update 1 is the first non-finite one."""
    cd_cfg = _config(world, "vanilla", checkpoint_every=1)
    cfg = dataclasses.replace(cd_cfg, optim=dataclasses.replace(cd_cfg.optim, peak_lr=1e30))
    # (the rollout's log-probs or the gradient go non-finite first, depending on the platform)
    with pytest.raises(errors.NonFiniteError, match=r"^update 1: (rollout: .* NaN/\+inf|loss "
                                                    r"\S+, grad_norm (nan|inf)) .*nothing of this "
                                                    r"update was logged or checkpointed \(newest "
                                                    r"checkpoint: 1\)"):
        trainer.train(cfg, str(tmp_path))
    assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [0]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


def _poison_update(monkeypatch, k_bad):
    """NaN teacher scores in the batch of update k_bad: a non-finite loss and gradient."""
    original, calls = trainer.make_batch, []

    def poisoned(prompts, ro, plan, config):
        batch = original(prompts, ro, plan, config)
        calls.append(None)
        if len(calls) - 1 == k_bad:
            batch = batch.replace(topk_teacher_logprob_btk=batch.topk_teacher_logprob_btk * np.nan)
        return batch

    monkeypatch.setattr(trainer, "make_batch", poisoned)


def test_nonfinite_loss_raises_or_skips(world, tmp_path, monkeypatch):
    _poison_update(monkeypatch, 1)
    with pytest.raises(errors.NonFiniteError, match=r"^update 1: loss nan, grad_norm nan "
                                                    r"\(prompts from .*train.jsonl:\d+ "
                                                    r"\(record \d+\).*\); the run diverged"):
        trainer.train(_config(world, "trb"), str(tmp_path / "raise"))
    assert [r["step"] for r in read_jsonl(str(tmp_path / "raise" / "metrics.jsonl"))] == [0]

    _poison_update(monkeypatch, 1)
    cfg = _config(world, "trb", on_nonfinite="skip")
    records = trainer.train(cfg, str(tmp_path / "skip"))
    assert [r["skipped_updates"] for r in records] == [0, 1, 1]
    assert records[1]["loss"] is None and records[2]["loss"] is not None
    # the skipped update left the step counter alone: update 2 runs at update 1's learning rate
    assert records[2]["learning_rate"] == records[1]["learning_rate"] != records[0]["learning_rate"]


def test_resume_falls_back_past_a_damaged_checkpoint(world, tmp_path, capfd):
    cfg = _config(world, "vanilla", checkpoint_every=1)
    trainer.train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_steps=2)),
                  str(tmp_path))
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "extra")  # a torn copy of the latest
    capfd.readouterr()
    records = trainer.train(cfg, str(tmp_path))  # 3 updates: resumes at 1, redoes 1 and 2
    err = capfd.readouterr().err
    assert "resume: skipped checkpoint 2 (" in err
    assert f"moved to {tmp_path}/checkpoints_damaged/2" in err
    assert "resume: resuming from checkpoint 1" in err
    assert [r["step"] for r in records] == [1, 2]
    assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [0, 1, 2]
    assert os.path.isdir(tmp_path / "checkpoints_damaged" / "2" / "state")
    manager = checkpointing.make_manager(tmp_path / "checkpoints")
    assert checkpointing.all_steps(manager)[-1] == 3
    manager.close()
    # evaluate names a damaged or missing checkpoint in one line too
    with pytest.raises(errors.CheckpointError, match=rf"^no checkpoint 7 in {tmp_path}/checkpoints "
                                                     r"\(have \[1, 2, 3\]\)$"):
        trainer.evaluate_run(cfg, str(tmp_path), step=7)
    shutil.rmtree(tmp_path / "checkpoints" / "3" / "extra")
    with pytest.raises(errors.CheckpointError, match=rf"^{tmp_path}/checkpoints/3 cannot be "
                                                     r"restored: \w+"):
        trainer.evaluate_run(cfg, str(tmp_path), step=3)

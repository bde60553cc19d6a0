"""The warmup-method table: each method's per-update plan against its definition (docs/method.md §2, §4)."""

import numpy as np
import pytest

from trb_jax import methods
from trb_jax import methods as M


def _plans(name, steps, **kw):
    cfg = M.MethodConfig(name=name, **kw)
    return [M.plan_step(k, cfg) for k in range(steps)]


def test_vanilla_is_student_opd_every_step():
    assert {(p.behavior, p.objective, p.warmup) for p in _plans("vanilla", 5)} == {("student", None, False)}
    assert _plans("vanilla", 1)[0].objective_name("tropd") == "tropd"  # the run's objective


def test_trb_eps_anneals_linearly_then_student():
    plans = _plans("trb", 6, eps0=0.02, warmup_steps=4)
    assert [p.eps for p in plans] == pytest.approx([0.02 * (1 - k / 4) for k in range(4)] + [0, 0])
    assert [p.behavior for p in plans] == ["trb"] * 4 + ["student"] * 2
    assert [p.warmup for p in plans] == [True] * 4 + [False] * 2


def test_trb_with_eps0_zero_is_vanilla():
    assert all(p.behavior == "student" for p in _plans("trb", 3, eps0=0.0))


def test_fixed_eps_keeps_the_budget_forever():
    plans = _plans("fixed_eps", 200, eps0=0.01, warmup_steps=3)
    assert {(p.behavior, p.eps) for p in plans} == {("fixed_eps", 0.01)}


def test_skd_then_student():
    plans = _plans("skd", 4, warmup_steps=2, skd_k=7, skd_tau_t=0.3)
    assert [(p.behavior, p.skd_k, p.skd_tau_t) for p in plans[:2]] == [("skd", 7, 0.3)] * 2
    assert [p.behavior for p in plans[2:]] == ["student"] * 2


def test_temperature_warmup_from_tau0_to_one():
    plans = _plans("temperature", 6, tau0=0.8, warmup_steps=4)
    assert [p.tau for p in plans] == pytest.approx([0.8, 0.85, 0.9, 0.95, 1.0, 1.0])
    assert [p.behavior for p in plans] == ["temperature"] * 4 + ["student"] * 2


def test_sft_warmup_then_vanilla_and_run_length():
    cfg = M.MethodConfig(name="sft_warmup", sft_steps=3)
    plans = [M.plan_step(k, cfg) for k in range(5)]
    assert [(p.behavior, p.objective_name("tropd"), p.phase) for p in plans] == (
        [("teacher", "sft", "sft")] * 3 + [("student", "tropd", "opd")] * 2)
    assert M.total_updates(cfg, 10) == 13
    assert M.total_updates(M.MethodConfig(name="trb"), 10) == 10


def test_veto_alpha_anneals_from_beta_start_to_one():
    plans = _plans("veto", 6, beta_start=0.2, warmup_steps=4)
    assert [p.target_alpha for p in plans] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert [p.objective_name("opd") for p in plans] == ["veto"] * 4 + ["opd"] * 2
    assert all(p.behavior == "student" for p in plans)


@pytest.mark.parametrize("kw, message", [
    (dict(name="dagger"), "method.name: unknown method 'dagger'"),
    (dict(warmup_steps=0), "method.warmup_steps: must be > 0, got 0"),
    (dict(warmup_steps=-3), "method.warmup_steps: must be > 0, got -3"),
    (dict(eps0=-0.1), "method.eps0: must be >= 0, got -0.1"),
    (dict(skd_k=0), "method.skd_k: must be in [1, 64], got 0"),
    (dict(tau0=0.0), "method.tau0: must be > 0, got 0.0"),
    (dict(sft_steps=0), "method.sft_steps: must be >= 1, got 0"),
    (dict(beta_start=1.5), "method.beta_start: must be in [0, 1], got 1.5"),
])
def test_bad_method_settings_name_the_field(kw, message):
    with pytest.raises(ValueError) as e:
        M.MethodConfig(**kw)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_negative_step_is_an_error():
    with pytest.raises(ValueError, match="step must be >= 0"):
        M.plan_step(-1, M.MethodConfig())


def _paper_run_config(method: str, **method_overrides):
    from trb_jax import config as config_lib

    cd = config_lib.load_config_file(config_lib.repo_config_path("opd"), f"method={method}")
    for key, value in method_overrides.items():
        cd.method[key] = value
    return config_lib.to_run_config(cd)


def _lr(cfg, k: int) -> float:
    """The learning rate of update k as the trainer runs it: the phase's schedule at the index
    within the phase (each phase starts from a fresh optimizer state)."""
    from trb_jax import train_step, trainer

    phase, index = methods.optimizer_phase(k, cfg.method)
    return float(train_step.make_schedule(trainer.phase_optim(cfg, phase))(index))


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_update_zero_learns_for_every_method(name):
    cfg = _paper_run_config(name)  # configs/opd.py: 10 warmup updates to lr 1e-6
    assert _lr(cfg, 0) == pytest.approx(cfg.optim.peak_lr / cfg.optim.warmup_steps, rel=1e-6)
    assert _lr(cfg, cfg.optim.warmup_steps - 1) == pytest.approx(cfg.optim.peak_lr, rel=1e-6)
    total = methods.total_updates(cfg.method, cfg.train.num_steps)
    assert all(_lr(cfg, k) > 0 for k in range(total))  # no update runs at lr 0


def test_opd_lr_does_not_depend_on_sft_steps():
    vanilla = _paper_run_config("vanilla")
    want = [_lr(vanilla, j) for j in range(vanilla.train.num_steps)]
    for sft_steps in (15, 25, 50):
        cfg = _paper_run_config("sft_warmup", sft_steps=sft_steps)
        got = [_lr(cfg, sft_steps + j) for j in range(cfg.train.num_steps)]
        np.testing.assert_array_equal(got, want)
        # the SFT phase: its own schedule, the same for every sft_steps (checkpoint 15 of a
        # 50-update SFT run is the 15-update run's)
        sft = [_lr(cfg, k) for k in range(sft_steps)]
        assert sft == [_lr(_paper_run_config("sft_warmup", sft_steps=50), k)
                       for k in range(sft_steps)]
        assert all(lr > 0 for lr in sft)
    cfg = _paper_run_config("sft_warmup")
    assert cfg.method.sft_checkpoints == (15, 25, 50) and cfg.method.sft_steps == 25


def test_teacher_prefix_guides_every_rollout_with_the_imitation_term():
    plans = _plans("teacher_prefix", 3, prefix_tokens=5)
    assert {(p.behavior, p.prefix_tokens, p.imitate_prefix, p.objective) for p in plans} == {
        ("teacher_prefix", 5, True, None)}
    with pytest.raises(ValueError, match="method.prefix_tokens: must be >= 1"):
        M.MethodConfig(name="teacher_prefix", prefix_tokens=0)

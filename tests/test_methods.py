"""The warmup-method table: each method's per-update plan against its definition (docs/method.md §2, §4)."""

import pytest

from trb_jax import methods as M


def _plans(name, steps, **kw):
    cfg = M.MethodConfig(name=name, **kw)
    return [M.plan_step(k, cfg) for k in range(steps)]


def test_vanilla_is_student_opd_every_step():
    assert {(p.behavior, p.loss, p.warmup) for p in _plans("vanilla", 5)} == {("student", "opd", False)}


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
    assert [(p.behavior, p.loss) for p in plans] == [("teacher", "sft")] * 3 + [("student", "opd")] * 2
    assert M.total_updates(cfg, 10) == 13
    assert M.total_updates(M.MethodConfig(name="trb"), 10) == 10


def test_veto_alpha_anneals_from_beta_start_to_one():
    plans = _plans("veto", 6, beta_start=0.2, warmup_steps=4)
    assert [p.target_alpha for p in plans] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert [p.loss for p in plans] == ["veto"] * 4 + ["opd"] * 2
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

"""Tests for trb_jax/rollout.py and trb_jax/behaviors.py on tiny random Qwen3 models.

Compilation dominates the runtime on CPU, so the tests share a few programs: one "wide" batch
(one prompt repeated over N rows; column 0 of every row is an independent draw from the behavior
distribution at the prompt) and a two-row padded batch. References are computed independently
from `qwen3.forward` / `qwen3.prefill` logits and `trust_region_blend`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from trb_jax import behaviors as B
from trb_jax import rollout as R
from trb_jax.blending import EosMap, merge_eos, trust_region_blend
from trb_jax.models import qwen3

VOCAB = 64
CFG = qwen3.Qwen3Config(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, intermediate_size=48,
                        tie_word_embeddings=False)  # fmt: skip
# Several EOS ids so that rows stop often; the shared stop slot (1) differs from both native ids.
EOS = EosMap.from_ids([1, 2, 3], [4, 5], stop_id=1)
STUDENT_EOS, TEACHER_EOS = 2, 5
N_WIDE, T_WIDE = 4096, 4
S_PROMPT, T_PROMPT = [7, 8, 9, 10, 11], [12, 7, 8, 9, 10, 11, 13]


def _params(seed: int) -> qwen3.Params:
    """Random params with std 0.2 matrices (spread-out logits) and unit norms."""
    rng = np.random.default_rng(seed)
    shapes = qwen3.param_shapes(CFG)
    return jax.tree_util.tree_map_with_path(
        lambda path, shape: jnp.asarray(
            np.ones(shape, np.float32) if "norm" in jax.tree_util.keystr(path)
            else rng.normal(0.0, 0.2, shape).astype(np.float32)),
        shapes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))


@functools.cache
def _models():
    return _params(0), _params(1)


def _spec(behavior, T):
    return R.RolloutSpec(behavior, T, EOS, STUDENT_EOS, TEACHER_EOS, top_k=16)


@functools.cache
def _wide_prompts() -> R.Prompts:
    s_ids, s_mask = R.pad_prompts([S_PROMPT] * N_WIDE)
    t_ids, t_mask = R.pad_prompts([T_PROMPT] * N_WIDE)
    return R.Prompts(jnp.asarray(s_ids), jnp.asarray(s_mask), jnp.asarray(t_ids), jnp.asarray(t_mask))


def _wide(behavior, knobs, seed=0, params_t="default"):
    ps, pt = _models()
    pt = pt if params_t == "default" else params_t
    keys = R.row_keys(jax.random.key(seed), np.arange(N_WIDE))
    return R.rollout(ps, pt, _wide_prompts(), keys, knobs, student_config=CFG,
                     teacher_config=CFG, spec=_spec(behavior, T_WIDE))


@functools.cache
def _prompt_logits():
    """EOS-merged next-token logits of each model at the wide prompt (temperature 1)."""
    ps, pt = _models()
    s_ids, s_mask = R.pad_prompts([S_PROMPT])  # padded to the wide batch's bucket: one compile
    t_ids, t_mask = R.pad_prompts([T_PROMPT])
    s = qwen3.forward_jit(ps, CFG, jnp.asarray(s_ids), jnp.asarray(s_mask))[0, -1]
    t = qwen3.forward_jit(pt, CFG, jnp.asarray(t_ids), jnp.asarray(t_mask))[0, -1]
    return merge_eos(s, EOS), merge_eos(t, EOS)


def _chi_square_pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square of token counts against probs, bins with expectation < 5 pooled."""
    n = tokens.size
    counts = np.bincount(tokens, minlength=probs.size).astype(np.float64)
    expected = n * probs
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    assert counts[probs == 0].sum() == 0, "sampled a token of probability 0"
    exp = exp[keep] * n / exp[keep].sum()
    statistic = np.sum((obs[keep] - exp) ** 2 / exp)
    return float(stats.chi2.sf(statistic, df=keep.sum() - 1))


# ---------------------------------------------------------------------------------------------
# Distributions


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_trb_first_token_frequencies_match_mu_star(eps):
    out = _wide("trb", B.make_knobs(eps=eps))
    s, t = _prompt_logits()
    blend = trust_region_blend(s, t, eps)
    assert 0.0 < float(blend.beta) < 1.0  # a real blend, not an end point
    probs = np.exp(np.asarray(blend.log_probs, np.float64))
    assert _chi_square_pvalue(np.asarray(out.tokens_bt[:, 0]), probs / probs.sum()) > 1e-3
    np.testing.assert_allclose(out.beta_bt[:, 0], blend.beta, rtol=1e-5)
    np.testing.assert_allclose(out.behavior_logprob_bt[:, 0],
                               blend.log_probs[out.tokens_bt[:, 0]], atol=1e-5)
    # The sampled statistics are per-token lookups of the EOS-merged temperature-1 models.
    np.testing.assert_allclose(out.student_logprob_bt[:, 0],
                               jax.nn.log_softmax(s)[out.tokens_bt[:, 0]], atol=1e-5)
    np.testing.assert_allclose(out.teacher_logprob_bt[:, 0],
                               jax.nn.log_softmax(t)[out.tokens_bt[:, 0]], atol=1e-5)
    # A wrong distribution is rejected by the same test (the test can fail).
    p_s = np.exp(np.asarray(jax.nn.log_softmax(s), np.float64))
    assert _chi_square_pvalue(np.asarray(out.tokens_bt[:, 0]), p_s / p_s.sum()) < 1e-6


def test_skd_rollout_first_token_matches_marginal():
    out = _wide("skd", B.make_knobs(skd_k=5, skd_tau_t=0.5))
    s, t = _prompt_logits()
    log_s = np.asarray(jax.nn.log_softmax(s), np.float64)
    t_np = np.asarray(t, np.float64)
    top = t_np >= np.sort(t_np)[::-1][4]
    q = np.exp(t_np / 0.5 - np.logaddexp.reduce(t_np / 0.5))
    p_s = np.exp(log_s)
    mu = np.where(top, p_s, 0.0) + p_s[~top].sum() * q
    tok = np.asarray(out.tokens_bt[:, 0])
    assert _chi_square_pvalue(tok, mu / mu.sum()) > 1e-3
    np.testing.assert_allclose(np.exp(out.behavior_logprob_bt[:, 0]), mu[tok], rtol=1e-4)
    replaced = np.asarray(out.skd_replaced_bt[:, 0])
    assert replaced.mean() == pytest.approx(p_s[~top].sum(), abs=0.03)
    # a replacement is a teacher draw (softmax(t / tau_T)); a kept proposal is the student's
    np.testing.assert_array_equal(out.from_teacher_bt, out.skd_replaced_bt)


def test_temperature_applies_to_the_logits_and_top_p_to_the_blend():
    s, t = _prompt_logits()
    # top_p -> 0 keeps only the argmax of the behavior distribution, after the blend: the
    # student's at eps = 0 (beta 0), the teacher's at a huge eps (beta 1). (Truncating each
    # model first would leave disjoint supports and beta = 0 for every eps.)
    assert int(jnp.argmax(s)) != int(jnp.argmax(t))
    for eps, argmax, beta in ((0.0, int(jnp.argmax(s)), 0), (1e6, int(jnp.argmax(t)), 1)):
        out = _wide("trb", B.make_knobs(eps=eps, top_p=1e-6))
        assert np.all(np.asarray(out.tokens_bt[:, 0]) == argmax)
        assert np.all(np.asarray(out.beta_bt[:, 0]) == beta)
    # Temperature divides both models' logits before the blend.
    out = _wide("trb", B.make_knobs(eps=0.05, temperature=0.7))
    blend = trust_region_blend(s / 0.7, t / 0.7, 0.05)
    np.testing.assert_allclose(out.behavior_logprob_bt[:, 0],
                               blend.log_probs[out.tokens_bt[:, 0]], atol=1e-5)
    np.testing.assert_allclose(out.student_logprob_bt[:, 0],
                               jax.nn.log_softmax(s)[out.tokens_bt[:, 0]], atol=1e-5)


def test_realised_kl_within_budget_every_token():
    for eps in (0.01, 0.1):
        out = _wide("trb", B.make_knobs(eps=eps))
        kl = np.asarray(out.kl_bt)[np.asarray(out.response_mask_bt)]
        assert kl.size > N_WIDE and np.all(kl <= eps * (1 + 1e-5)), kl.max()
        assert kl.max() > 0.5 * eps  # the budget is actually used


def test_trb_eps_zero_is_student_and_huge_eps_is_teacher():
    student = _wide("student", B.make_knobs(), params_t=None)
    trb0 = _wide("trb", B.make_knobs(eps=0.0))
    np.testing.assert_array_equal(trb0.tokens_bt, student.tokens_bt)
    np.testing.assert_array_equal(trb0.response_mask_bt, student.response_mask_bt)
    np.testing.assert_allclose(trb0.student_logprob_bt, student.student_logprob_bt, atol=1e-6)
    assert np.all(np.asarray(trb0.beta_bt) == 0)
    teacher = _wide("teacher", B.make_knobs())
    trb_big = _wide("trb", B.make_knobs(eps=1e6))
    np.testing.assert_array_equal(trb_big.tokens_bt, teacher.tokens_bt)
    assert np.all(np.asarray(trb_big.beta_bt)[np.asarray(trb_big.response_mask_bt)] == 1)
    assert not np.array_equal(student.tokens_bt, teacher.tokens_bt)  # the two differ at all
    # a blend is never counted as a teacher draw, not even at beta = 1
    assert not np.asarray(student.from_teacher_bt).any()
    assert not np.asarray(trb_big.from_teacher_bt).any()
    np.testing.assert_array_equal(teacher.from_teacher_bt, teacher.response_mask_bt)


def test_teacher_prefix_samples_the_teacher_then_the_student():
    """Same keys: prefix 0 draws the student's tokens, prefix >= T the teacher's, and a prefix
    of 2 the teacher's first two tokens, with exactly min(2, length) leading teacher draws."""
    student = _wide("student", B.make_knobs(), params_t=None)
    teacher = _wide("teacher", B.make_knobs())
    none = _wide("teacher_prefix", B.make_knobs(prefix_tokens=0))
    np.testing.assert_array_equal(none.tokens_bt, student.tokens_bt)
    assert not np.asarray(none.from_teacher_bt).any()
    whole = _wide("teacher_prefix", B.make_knobs(prefix_tokens=T_WIDE))
    np.testing.assert_array_equal(whole.tokens_bt, teacher.tokens_bt)
    np.testing.assert_array_equal(whole.from_teacher_bt, whole.response_mask_bt)

    prefix = 2
    out = _wide("teacher_prefix", B.make_knobs(prefix_tokens=prefix))
    lengths = np.asarray(out.lengths_b)
    assert (lengths > prefix).any() and (lengths < prefix).any()  # both cases occur
    from_t = np.arange(T_WIDE)[None] < np.minimum(prefix, lengths)[:, None]
    np.testing.assert_array_equal(out.from_teacher_bt, from_t)
    np.testing.assert_array_equal(out.tokens_bt[:, :prefix], teacher.tokens_bt[:, :prefix])
    assert not np.array_equal(out.tokens_bt, teacher.tokens_bt)
    # The behavior log-prob is that of the source sampled at the position (temperature 1, no
    # top-p: the EOS-merged model itself).
    mask = np.asarray(out.response_mask_bt)
    source_lp = np.where(from_t, out.teacher_logprob_bt, out.student_logprob_bt)
    np.testing.assert_allclose(np.asarray(out.behavior_logprob_bt)[mask], source_lp[mask],
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.beta_bt)[mask], from_t[mask])
    kl = np.asarray(out.kl_bt)
    assert np.all(kl[mask & ~from_t] == 0) and np.all(kl[from_t] > 0)


def test_student_program_has_no_teacher():
    assert R.select_program("trb", 0.0) == "student"
    assert R.select_program("fixed_eps", np.zeros(3)) == "student"
    assert R.select_program("trb", 1e-3) == "trb"
    assert R.select_program("skd", 0.0) == "skd"
    assert R.select_program("teacher_prefix", prefix_tokens=0) == "student"
    assert R.select_program("teacher_prefix", prefix_tokens=3) == "teacher_prefix"
    assert R.select_program("teacher_prefix") == "teacher_prefix"
    ps, _ = _models()
    keys = R.row_keys(jax.random.key(0), np.arange(N_WIDE))
    kw = dict(student_config=CFG, teacher_config=None, spec=_spec("student", T_WIDE))
    state = jax.eval_shape(functools.partial(R._start, **kw), ps, None, _wide_prompts(), keys,
                           B.make_knobs())
    assert state.t_cache is None and state.t_logits_bv is None
    prefills = []
    orig = qwen3.prefill
    try:  # a fresh trace (new T) with a counting prefill: only the student is prefilled
        qwen3.prefill = lambda p, c, *a: prefills.append(c) or orig(p, c, *a)
        jax.eval_shape(functools.partial(R._start, **{**kw, "spec": _spec("student", 3)}),
                       ps, None, _wide_prompts(), keys, B.make_knobs())
        jax.eval_shape(functools.partial(R._start, **{**kw, "teacher_config": CFG,
                                                      "spec": _spec("trb", 3)}),
                       ps, ps, _wide_prompts(), keys, B.make_knobs())
    finally:
        qwen3.prefill = orig
    assert len(prefills) == 3  # 1 for the student program, 2 for trb
    out = _wide("student", B.make_knobs(), params_t=None)
    assert out.topk_ids_btk is None and np.all(np.isnan(np.asarray(out.teacher_logprob_bt)))
    assert out.teacher_topk_ids_btk is None and out.teacher_topk_teacher_logprob_btk is None


def test_no_recompile_across_knob_values():
    _wide("trb", B.make_knobs(eps=0.02))
    before = R.compiled_program_count()
    for eps, tau, k in [(0.0, 0.9, 3), (0.07, 1.1, 15), (1e6, 0.5, 40)]:
        _wide("trb", B.make_knobs(eps=eps, tau=tau, skd_k=k, skd_tau_t=0.3, temperature=0.9))
    assert R.compiled_program_count() == before


# ---------------------------------------------------------------------------------------------
# Padding, stopping, caches


LONG_S = list(range(20, 40))
LONG_T = [12] + LONG_S + [13]
PAD_ROW_IDS = (2, N_WIDE + 2)  # row 0 is row 2 of the wide batch (same prompt, same key)


def _padded_batch():
    """Row 0: the wide prompts; row 1: longer prompts, so both models' buckets grow to 32."""
    s_ids, s_mask = R.pad_prompts([S_PROMPT, LONG_S])
    t_ids, t_mask = R.pad_prompts([T_PROMPT, LONG_T])
    return R.Prompts(*map(jnp.asarray, (s_ids, s_mask, t_ids, t_mask)))


T_PAD = 24


@functools.cache
def _padded_rollout():
    """The `teacher` behavior runs both models (both caches, both paddings); the blend itself
    is covered by the wide-batch tests."""
    ps, pt = _models()
    keys = R.row_keys(jax.random.key(0), PAD_ROW_IDS)
    return R.rollout(ps, pt, _padded_batch(), keys, B.make_knobs(),
                     student_config=CFG, teacher_config=CFG, spec=_spec("teacher", T_PAD))


def test_left_padding_does_not_change_a_rows_samples():
    alone = _wide("teacher", B.make_knobs())  # row 2: 11 (student) / 9 (teacher) pad slots
    batch = _padded_rollout()  # row 0: 27 / 25 pad slots next to a longer prompt
    assert _wide_prompts().student_ids_bt.shape[1] == 16
    assert _padded_batch().student_ids_bt.shape[1] == 32
    r = PAD_ROW_IDS[0]
    n = min(int(alone.lengths_b[r]), T_WIDE)
    np.testing.assert_array_equal(alone.tokens_bt[r, :n], batch.tokens_bt[0, :n])
    np.testing.assert_array_equal(alone.response_mask_bt[r], batch.response_mask_bt[0, :T_WIDE])
    for field in ("student_logprob_bt", "teacher_logprob_bt", "behavior_logprob_bt", "kl_bt"):
        np.testing.assert_allclose(getattr(alone, field)[r, :n], getattr(batch, field)[0, :n],
                                   atol=2e-4, err_msg=field)


def test_rows_stop_independently_at_eos():
    out = _padded_rollout()
    tokens, mask = np.asarray(out.tokens_bt), np.asarray(out.response_mask_bt)
    lengths = np.asarray(out.lengths_b)
    assert lengths[0] != lengths[1] and lengths.max() < T_PAD
    assert int(out.num_steps) == lengths.max()  # the loop exits once every row has stopped
    for row in range(2):
        n = lengths[row]
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert tokens[row, n - 1] == EOS.stop_id  # stopped on the shared stop event
        assert not np.isin(tokens[row, : n - 1], EOS.eos_ids).any()  # other EOS ids merged
        assert out.student_tokens_bt[row, n - 1] == STUDENT_EOS
        assert out.teacher_tokens_bt[row, n - 1] == TEACHER_EOS


def test_logprobs_match_teacher_forced_rescoring():
    """The KV-cache decode reproduces a full forward over prompt + response for both models,
    including both top-k supports and both models' log-probs on each."""
    out = _padded_rollout()
    ps, pt = _models()
    prompts = _padded_batch()
    mask = np.asarray(out.response_mask_bt)
    np.testing.assert_array_equal(out.from_teacher_bt, mask)  # `teacher`: every token
    fresh = {}
    for params, ids, pmask, toks, lp_field in [
        (ps, prompts.student_ids_bt, prompts.student_mask_bt, out.student_tokens_bt, "student"),
        (pt, prompts.teacher_ids_bt, prompts.teacher_mask_bt, out.teacher_tokens_bt, "teacher"),
    ]:
        assert ids.shape[1] == 32  # both models' prompts fall into the 32 bucket
        full = np.concatenate([np.asarray(ids), np.asarray(toks)], 1)
        full_mask = np.concatenate([np.asarray(pmask), np.ones_like(toks)], 1)
        logits = qwen3.forward_jit(params, CFG, jnp.asarray(full), jnp.asarray(full_mask))
        p0 = 32  # first response position
        log_p = jax.nn.log_softmax(merge_eos(logits[:, p0 - 1: p0 - 1 + T_PAD], EOS), -1)
        ref = np.take_along_axis(np.asarray(log_p), np.asarray(out.tokens_bt)[..., None], -1)[..., 0]
        got = np.asarray(getattr(out, f"{lp_field}_logprob_bt"))
        np.testing.assert_allclose(got[mask], ref[mask], atol=2e-4, err_msg=lp_field)
        fresh[lp_field] = np.asarray(log_p)
        if lp_field == "teacher":
            p = np.exp(np.asarray(log_p, np.float64))
            ent = -np.sum(np.where(p > 0, p * np.where(p > 0, np.asarray(log_p), 0.0), 0.0), -1)
            np.testing.assert_allclose(np.asarray(out.teacher_entropy_bt)[mask], ent[mask],
                                       atol=2e-4)
    for owner, prefix in (("student", ""), ("teacher", "teacher_")):
        ids = np.asarray(getattr(out, f"{prefix}topk_ids_btk"))
        assert ids.shape == (2, T_PAD, 16) and ids.dtype == np.int32
        # The ids are the owner's 16 most likely tokens in order (compared by value, so a
        # near-tie that rounds differently in the two forwards cannot fail the test).
        top16 = -np.sort(-fresh[owner], axis=-1)[..., :16]
        np.testing.assert_allclose(np.take_along_axis(fresh[owner], ids, -1)[mask], top16[mask],
                                   atol=2e-4, err_msg=owner)
        assert np.all(np.diff(np.sort(ids, -1), axis=-1)[mask] > 0)  # distinct ids
        for model in ("student", "teacher"):
            name = f"{prefix}topk_{model}_logprob_btk"
            got = np.asarray(getattr(out, name))
            assert got.shape == (2, T_PAD, 16) and got.dtype == np.float32
            np.testing.assert_allclose(got[mask], np.take_along_axis(fresh[model], ids, -1)[mask],
                                       atol=2e-4, err_msg=name)
    # the two supports differ (two different models), so the teacher's is a new record
    assert not np.array_equal(out.topk_ids_btk, out.teacher_topk_ids_btk)


# ---------------------------------------------------------------------------------------------
# Behavior functions on hand-built logits


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def test_skd_rule_on_hand_built_logits():
    v = 8
    # Student is sure of token 0 (row 0) or token 3 (row 1); the teacher ranks 3 > 2 > 1 > ...
    # and token 0 last. K = 2: token 3 is in the teacher's top-2, token 0 is not.
    s = jnp.full((2, v), -30.0).at[0, 0].set(30.0).at[1, 3].set(30.0)
    t = jnp.array([[-5.0, 1.0, 2.0, 3.0, 0.0, -1.0, -2.0, -3.0]] * 2)
    knobs = B.make_knobs(skd_k=2, skd_tau_t=0.2)
    n = 2000
    step = jax.vmap(lambda k: B.skd(s, t, jnp.stack([k, k]), knobs))(_keys(n))
    tok, repl = np.asarray(step.token_b), np.asarray(step.replaced_b)
    assert repl[:, 0].all() and not repl[:, 1].any()
    assert np.all(tok[:, 1] == 3)  # kept
    # Replacement is a teacher sample at tau_T = 0.2: token 3 w.p. 1/(1+e^-5+...) ~ 0.993.
    q = np.exp(np.asarray(t[0]) / 0.2 - np.logaddexp.reduce(np.asarray(t[0]) / 0.2))
    assert _chi_square_pvalue(tok[:, 0], q) > 1e-3
    assert np.mean(tok[:, 0] == 3) == pytest.approx(q[3], abs=0.01)
    # Marginal behavior probabilities: normalised, row 0 = q, row 1 = pi_S.
    log_mu = np.asarray(step.log_mu_bv[0], np.float64)
    np.testing.assert_allclose(np.exp(log_mu).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.exp(log_mu[0]), q, atol=1e-6)
    np.testing.assert_allclose(np.exp(log_mu[1]), np.exp(jax.nn.log_softmax(s[1])), atol=1e-6)
    # K = 1: token 3 is the teacher's argmax and is still kept; K = 5 keeps everything but 0.
    step1 = B.skd(s, t, _keys(2), B.make_knobs(skd_k=1))
    assert not bool(step1.replaced_b[1]) and bool(step1.replaced_b[0])


def test_temperature_and_student_behaviors():
    s = jnp.array([[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 0.0, -3.0]])
    knobs = B.make_knobs(tau=0.5)
    step = B.temperature(s, None, _keys(2), knobs)
    np.testing.assert_allclose(step.log_mu_bv, jax.nn.log_softmax(s / 0.5), atol=1e-6)
    p = np.exp(np.asarray(step.log_mu_bv, np.float64))
    ref_kl = np.sum(p * (np.log(p) - np.asarray(jax.nn.log_softmax(s), np.float64)), -1)
    np.testing.assert_allclose(step.kl_b, ref_kl, rtol=1e-4)
    base = B.student(s, None, _keys(2), knobs)
    assert np.all(np.asarray(base.kl_b) == 0) and np.all(np.asarray(base.beta_b) == 0)
    assert set(B.BEHAVIORS) == {"student", "trb", "fixed_eps", "skd", "temperature", "teacher",
                                "teacher_prefix"}
    assert B.NEEDS_TEACHER == {"trb", "fixed_eps", "skd", "teacher", "teacher_prefix"}


def test_top_p_mask_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: np.isfinite(np.asarray(B.top_p_mask(logits, jnp.float32(p))))[0]  # noqa: E731
    assert kept(0.5).tolist() == [True, False, False, False]
    assert kept(0.79).tolist() == [True, True, False, False]
    assert kept(0.81).tolist() == [True, True, True, False]
    assert kept(1.0).all()


def test_pad_prompts_buckets():
    ids, mask = R.pad_prompts([[5, 6, 7], [1] * 17])
    assert ids.shape == (2, 32) and mask.sum() == 20 and ids[0, -3:].tolist() == [5, 6, 7]
    assert mask[0, :-3].sum() == 0
    assert R.bucket_length(16) == 16 and R.bucket_length(17) == 32
    with pytest.raises(ValueError):
        R.bucket_length(10**6)
    with pytest.raises(ValueError):
        R.RolloutSpec("nope", 4, EOS, 2, 5)

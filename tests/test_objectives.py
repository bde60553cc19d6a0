"""Objectives: the registry, float64 NumPy references, and the chunked head's gradients.

Every objective is checked three ways: its per-token values against a float64 NumPy
reference written from the method's formulas; its gradient w.r.t. the student's logits
against a float64 hand-derived gradient (TrOPD) or the float64 references of the KL pieces;
and the chunked custom-VJP LM head against `jax.grad` of the naive full-logits loss (tied and
untied heads, stored and teacher modes).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from trb_jax import losses, objectives
from trb_jax import train_step as ts
from trb_jax.blending import EosMap, merge_eos
from trb_jax.models import qwen3

from test_train_step import (EOS, K, PARAMS_S, PARAMS_T, STUDENT, T, TEACHER, assert_trees_close,
                             chunked_loss, config, full_logits, make_batch)


# ------------------------------------------------------------------------------------------
# float64 references


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    top = z.max(-1, keepdims=True)
    return z - (top + np.log(np.exp(z - top).sum(-1, keepdims=True)))


def np_topk_kl(log_p_k, log_q_k, support):
    """KL(p || q) on k ids from full-vocabulary log-probs there (float64, one row)."""
    if support == "renormalized":
        lp, lq = np_log_softmax(log_p_k), np_log_softmax(log_q_k)
    elif support == "tail_bucket":
        tail = lambda lk: np.append(lk, np.log(max(1.0 - np.exp(lk).sum(), 1e-30)))  # noqa: E731
        lp, lq = tail(log_p_k), tail(log_q_k)
    else:
        lp, lq = np.asarray(log_p_k, np.float64), np.asarray(log_q_k, np.float64)
    return float((np.exp(lp) * (lp - lq)).sum())


def np_teacher_topk(log_t, k):
    return np.argsort(-log_t, kind="stable")[:k]


def np_tropd(z_s, z_t, a, cfg, k):
    """TrOPD's per-token loss at sampled token a, from raw logits (float64, one row)."""
    log_s, log_t = np_log_softmax(z_s), np_log_softmax(z_t)
    r = log_t[a] - log_s[a]
    trust = min(1.0, np.exp(r)) >= cfg.trust_threshold
    adv = r if trust else (0.0 if cfg.outlier == "mask" else np.clip(r, -cfg.clip_tau, cfg.clip_tau))
    ids = np_teacher_topk(log_t, k)
    fkl = np_topk_kl(log_t[ids], log_s[ids], cfg.topk_support)
    return -adv * log_s[a] + (0.0 if trust else cfg.outlier_fkl_weight * fkl), trust


def np_grad_tropd(z_s, z_t, a, cfg, k):
    """d/dz_s of np_tropd (float64): -A (e_a - p) for the policy-gradient term (A constant),
    plus, at outliers, w x the gradient of KL(t || s) on the teacher's top-k K:
      renormalized   s'_i - t'_i on K (primes: renormalised over K), 0 off K;
      unrenormalized -t_i [i in K] + p_i T_K   (T_K: the teacher's mass on K);
      tail_bucket    the unrenormalized one + (t_tail / s_tail) p_i ([i in K] - P_K)."""
    log_s, log_t = np_log_softmax(z_s), np_log_softmax(z_t)
    p, t = np.exp(log_s), np.exp(log_t)
    r = log_t[a] - log_s[a]
    trust = min(1.0, np.exp(r)) >= cfg.trust_threshold
    adv = r if trust else (0.0 if cfg.outlier == "mask" else np.clip(r, -cfg.clip_tau, cfg.clip_tau))
    onehot = np.eye(len(p))[a]
    g = -adv * (onehot - p)
    if trust:
        return g
    ids = np_teacher_topk(log_t, k)
    in_k = np.isin(np.arange(len(p)), ids).astype(np.float64)
    t_k, p_k = t[ids].sum(), p[ids].sum()
    if cfg.topk_support == "renormalized":
        g_fkl = in_k * (p / p_k - t / t_k)
    else:
        g_fkl = -t * in_k + p * t_k
        if cfg.topk_support == "tail_bucket":
            g_fkl += (1 - t_k) / (1 - p_k) * p * (in_k - p_k)
    return g + cfg.outlier_fkl_weight * g_fkl


def terms_from_logits(z_s, z_t, a, k, supports):
    """TokenTerms at every support from full logits [..., V] (the naive path)."""
    log_s, log_t = jax.nn.log_softmax(z_s, axis=-1), jax.nn.log_softmax(z_t, axis=-1)

    def at(ids):
        return objectives.Support(jnp.take_along_axis(log_s, ids, -1), jnp.take_along_axis(log_t, ids, -1))

    parts = {}
    if "student_topk" in supports:
        parts["student_topk"] = at(losses.topk_support(log_s, k))
    if "teacher_topk" in supports:
        parts["teacher_topk"] = at(losses.topk_support(log_t, k))
    if "sampled" in supports:
        parts["sampled"] = at(a[..., None])
    return objectives.TokenTerms(**parts)


def random_logits(seed, rows, vocab=48, scale=2.5):
    rng = np.random.default_rng(seed)
    z_s = rng.normal(size=(rows, vocab)) * scale
    z_t = rng.normal(size=(rows, vocab)) * scale
    a = rng.integers(0, vocab, size=rows)
    return z_s.astype(np.float32), z_t.astype(np.float32), a.astype(np.int32)


TROPD_CONFIGS = [
    objectives.ObjectiveConfig(name="tropd", topk_support=support, outlier=outlier,
                               trust_threshold=threshold, clip_tau=1.5, outlier_fkl_weight=0.7)
    for support in losses.TOPK_SUPPORTS for outlier in objectives.OUTLIER_MODES
    for threshold in (0.1, 0.6)
]


# ------------------------------------------------------------------------------------------
# Per-token values and gradients


@pytest.mark.parametrize("cfg", TROPD_CONFIGS, ids=lambda c: f"{c.topk_support}-{c.outlier}-{c.trust_threshold}")
def test_tropd_values_and_gradients_match_float64_reference(cfg):
    z_s, z_t, a = random_logits(1, rows=24)
    per_token = objectives.get("tropd").per_token

    def total(z):
        loss, diag = per_token(terms_from_logits(z, z_t, jnp.asarray(a), K, ("teacher_topk", "sampled")), cfg)
        return jnp.sum(loss), (loss, diag)

    (_, (got, diag)), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(jnp.asarray(z_s))
    want = [np_tropd(z_s[i], z_t[i], a[i], cfg, K) for i in range(len(a))]
    trust = np.array([w[1] for w in want])
    assert 0 < trust.sum() < len(a)  # both regions are exercised
    np.testing.assert_array_equal(np.asarray(diag["trust_share"]) > 0, trust)
    np.testing.assert_allclose(np.asarray(got), [w[0] for w in want], rtol=2e-5, atol=2e-5)
    want_g = np.stack([np_grad_tropd(z_s[i], z_t[i], a[i], cfg, K) for i in range(len(a))])
    np.testing.assert_allclose(np.asarray(grad), want_g, rtol=1e-4, atol=2e-5)
    k1 = np_log_softmax(z_s)[np.arange(len(a)), a] - np_log_softmax(z_t)[np.arange(len(a)), a]
    np.testing.assert_allclose(np.asarray(diag["k1"]), k1, rtol=1e-5, atol=1e-5)


def test_tropd_trust_gradient_is_the_reverse_kl_gradient_in_expectation():
    """The trust-region term is the K1 policy gradient: averaged over a ~ pi_S (exactly, by
    summing over the vocabulary with weights pi_S(a)) it equals grad KL(pi_S || pi_T)."""
    z_s, z_t, _ = random_logits(2, rows=1, vocab=12, scale=0.5)
    cfg = objectives.ObjectiveConfig(name="tropd", trust_threshold=1e-6)
    p = np.exp(np_log_softmax(z_s[0]))
    assert all(np_tropd(z_s[0], z_t[0], a, cfg, K)[1] for a in range(12))  # all in the trust region
    expected = sum(p[a] * np_grad_tropd(z_s[0], z_t[0], a, cfg, K) for a in range(12))
    log_s, log_t = np_log_softmax(z_s[0]), np_log_softmax(z_t[0])
    kl_grad = p * ((log_s - log_t) - (p * (log_s - log_t)).sum())  # d/dz KL(softmax(z) || t)
    np.testing.assert_allclose(expected, kl_grad, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 6.0),
       threshold=st.floats(0.01, 1.0), outlier=st.sampled_from(objectives.OUTLIER_MODES))
def test_tropd_properties(seed, scale, threshold, outlier):
    """Finite everywhere; the outlier forward KL is >= 0; mask gives outliers no
    policy-gradient term; the trust share is the fraction with acceptance >= threshold."""
    z_s, z_t, a = random_logits(seed, rows=6, vocab=32, scale=scale)
    cfg = objectives.ObjectiveConfig(name="tropd", trust_threshold=threshold, outlier=outlier)
    terms = terms_from_logits(jnp.asarray(z_s), jnp.asarray(z_t), jnp.asarray(a), K,
                              ("teacher_topk", "sampled"))
    loss, diag = objectives.get("tropd").per_token(terms, cfg)
    assert np.isfinite(np.asarray(loss)).all()
    assert (np.asarray(diag["teacher_topk_fkl"]) >= -1e-6).all()
    r = -np.asarray(diag["k1"], np.float64)
    trust = np.minimum(1.0, np.exp(r)) >= threshold
    clear = np.abs(np.exp(r) / threshold - 1) > 1e-5  # float32 r: a tie may fall either way
    np.testing.assert_array_equal((np.asarray(diag["trust_share"]) > 0)[clear], trust[clear])
    trust = np.asarray(diag["trust_share"]) > 0
    if outlier == "mask":
        fkl = np.asarray(diag["teacher_topk_fkl"])
        np.testing.assert_allclose(np.asarray(loss)[~trust], fkl[~trust], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("support", losses.TOPK_SUPPORTS)
def test_opd_and_forward_kl_primitives_match_float64(support):
    z_s, z_t, _ = random_logits(3, rows=10)
    log_s, log_t = np_log_softmax(z_s), np_log_softmax(z_t)
    ids_s = np.stack([np_teacher_topk(r, K) for r in log_s])
    ids_t = np.stack([np_teacher_topk(r, K) for r in log_t])
    take = lambda x, i: np.take_along_axis(x, i, -1).astype(np.float32)  # noqa: E731
    rev = losses.topk_reverse_kl_from_log_probs(take(log_s, ids_s), take(log_t, ids_s), support=support)
    fwd = losses.topk_forward_kl_from_log_probs(take(log_s, ids_t), take(log_t, ids_t), support=support)
    want_rev = [np_topk_kl(log_s[i, ids_s[i]], log_t[i, ids_s[i]], support) for i in range(10)]
    want_fwd = [np_topk_kl(log_t[i, ids_t[i]], log_s[i, ids_t[i]], support) for i in range(10)]
    np.testing.assert_allclose(np.asarray(rev), want_rev, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(fwd), want_fwd, rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------------------------------
# The chunked custom-VJP head against the naive full-logits loss, every objective


def _naive_loss(name, head, x, teacher, xt, tokens, mask_bt, alpha, prefix_bt, cfg):
    z_s = merge_eos(head(x), EOS)
    z_t = merge_eos(teacher(xt), EOS)
    tok = jnp.where(jnp.isin(tokens, jnp.asarray(EOS.eos_ids)), EOS.stop_id, tokens)
    spec = objectives.get(name)
    supports = set(spec.supports) | ({"teacher_topk"} if prefix_bt is not None else set())
    terms = terms_from_logits(z_s, z_t, tok, K, supports).replace(alpha=alpha)
    per, _ = spec.per_token(terms, cfg)
    if prefix_bt is not None:
        top = terms.teacher_topk
        fkl = losses.topk_forward_kl_from_log_probs(top.log_s, top.log_t, support=cfg.topk_support)
        per = jnp.where(prefix_bt, cfg.prefix_fkl_weight * fkl, per)
    return losses.masked_mean(per, mask_bt)


def _stored_source(name, head, x, teacher, xt, tokens, prefix):
    """What a rollout stores for the supports of `name` (from full logits)."""
    log_s = jax.nn.log_softmax(merge_eos(head(x), EOS), -1)
    log_t = jax.nn.log_softmax(merge_eos(teacher(xt), EOS), -1)
    tok = jnp.where(jnp.isin(tokens, jnp.asarray(EOS.eos_ids)), EOS.stop_id, tokens)
    supports = set(objectives.get(name).supports) | ({"teacher_topk"} if prefix else set())
    out = {}
    if "student_topk" in supports:
        ids = losses.topk_support(log_s, K)
        out.update(topk_ids_btk=ids, topk_teacher_logprob_btk=jnp.take_along_axis(log_t, ids, -1))
    if "teacher_topk" in supports:
        ids = losses.topk_support(log_t, K)
        out.update(teacher_topk_ids_btk=ids, teacher_topk_logprob_btk=jnp.take_along_axis(log_t, ids, -1))
    if "sampled" in supports and objectives.get(name).needs_teacher:
        out["sampled_teacher_logprob_bt"] = jnp.take_along_axis(log_t, tok[..., None], -1)[..., 0]
    return out


HEAD_CASES = [(name, tied, mode, prefix)
              for name in objectives.names() for tied in (False, True) for mode in ("stored", "teacher")
              for prefix in (False, True)
              if not (name == "sft" and (mode == "stored" or prefix)) and not (prefix and tied)]


@pytest.mark.parametrize("name,tied,mode,prefix", HEAD_CASES)
def test_chunked_head_equals_naive_full_logits_loss(name, tied, mode, prefix):
    """T = 11 in chunks of 4 (a padded last chunk), V = 128 in slices of 48 (the last overlaps
    the previous one); some response tokens are native EOS ids (the merged stop event)."""
    cfg_h, params_h = (TEACHER, PARAMS_T) if tied else (STUDENT, PARAMS_S)
    rng = np.random.default_rng(9)
    x_btd = jnp.asarray(rng.normal(size=(3, 11, cfg_h.hidden_size)), jnp.float32)
    xt_btd = jnp.asarray(rng.normal(size=(3, 11, 48)), jnp.float32)
    mask_bt = jnp.asarray(rng.random((3, 11)) < 0.8)
    tokens = jnp.asarray(rng.integers(0, STUDENT.vocab_size, (3, 11)), jnp.int32)
    tokens = tokens.at[0, 2].set(EOS.eos_ids[0]).at[1, 5].set(EOS.eos_ids[-1])
    prefix_bt = jnp.asarray(np.arange(11)[None] < np.array([[3], [0], [6]])) if prefix else None
    head, teacher = ts.lm_head(params_h, cfg_h), ts.lm_head(PARAMS_T, TEACHER)
    cfg = objectives.ObjectiveConfig(name=name, topk_support="tail_bucket" if name != "veto" else "renormalized",
                                     trust_threshold=0.3, prefix_fkl_weight=0.5)
    alpha = jnp.float32(0.6) if objectives.get(name).needs_alpha else None

    def naive(head, x):
        return _naive_loss(name, head, x, teacher, xt_btd, tokens, mask_bt, alpha, prefix_bt, cfg)

    def chunked(head, x):
        if mode == "stored":
            src = {"stored": _stored_source(name, head, x, teacher, xt_btd, tokens, prefix)}
            src = src if src["stored"] else {}
        elif objectives.get(name).needs_teacher or prefix:
            src = {"teacher": teacher, "teacher_x_btd": xt_btd}
        else:
            src = {}
        per, _, _ = ts.chunked_token_loss(head, x, tokens, objective=cfg, chunk_size=4,
                                          vocab_chunk_size=48, top_k=K, eos=EOS, target_alpha=alpha,
                                          prefix_mask_bt=prefix_bt, **src)  # fmt: skip
        return losses.masked_mean(per, mask_bt)

    want, want_g = jax.jit(jax.value_and_grad(naive, argnums=(0, 1)))(head, x_btd)
    got, got_g = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(head, x_btd)
    assert abs(float(want)) > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5 * float(np.abs(w).max()))


# ------------------------------------------------------------------------------------------
# The train step: stored mode equals teacher mode for TrOPD; diagnostics; the registry


def _tropd_stored_batch(batch, params_s=PARAMS_S):
    s, st = batch.input_ids_bs.shape[1], batch.teacher_input_ids_bs.shape[1]
    lt = full_logits(PARAMS_T, TEACHER, batch.teacher_input_ids_bs, batch.teacher_attention_mask_bs)[:, st - T - 1 : st - 1]
    log_t = jax.nn.log_softmax(lt, -1)
    ids = losses.topk_support(log_t, K)
    tok = batch.input_ids_bs[:, -T:]
    tok = jnp.where(jnp.isin(tok, jnp.asarray(EOS.eos_ids)), EOS.stop_id, tok)
    return batch.replace(teacher_topk_ids_btk=ids, teacher_topk_logprob_btk=jnp.take_along_axis(log_t, ids, -1),
                         sampled_teacher_logprob_bt=jnp.take_along_axis(log_t, tok[..., None], -1)[..., 0],
                         teacher_input_ids_bs=None, teacher_attention_mask_bs=None)  # fmt: skip


def test_tropd_stored_mode_equals_teacher_mode_and_logs_its_diagnostics():
    batch = make_batch(0)
    cfg = dataclasses.replace(config(3), objective=objectives.ObjectiveConfig(name="tropd", trust_threshold=0.3))
    grad_fn = jax.jit(jax.value_and_grad(chunked_loss), static_argnums=2)
    want, want_g = grad_fn(PARAMS_S, batch, cfg)
    got, got_g = grad_fn(PARAMS_S, _tropd_stored_batch(batch), cfg)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert_trees_close(got_g, want_g)
    state = ts.init_train_state(jax.tree.map(jnp.copy, PARAMS_S), cfg, jax.random.key(0))
    _, metrics = ts.jit_train_step(cfg)(state, batch, PARAMS_T)
    for name in ("trust_share", "k1", "teacher_topk_fkl", "student_entropy", "grad_norm"):
        assert np.isfinite(float(metrics[name])), name
    assert 0.0 < float(metrics["trust_share"]) < 1.0
    with pytest.raises(ValueError, match="stored mode needs Batch.sampled_teacher_logprob_bt"):
        ts.jit_train_step(cfg)(state, _tropd_stored_batch(batch).replace(sampled_teacher_logprob_bt=None))


def test_prefix_tokens_get_only_the_imitation_term():
    """A prefix mask over every token: the loss is prefix_fkl_weight x the teacher-top-k forward
    KL, whatever the objective; the objective's diagnostics count no prefix token."""
    batch = make_batch(3)
    everything = batch.replace(prefix_mask_bt=jnp.ones_like(batch.response_mask_bt))
    values = {}
    for name in ("opd", "tropd"):
        cfg = dataclasses.replace(config(3), objective=objectives.ObjectiveConfig(name=name, prefix_fkl_weight=0.25))
        values[name] = float(jax.jit(chunked_loss, static_argnums=2)(PARAMS_S, everything, cfg))
        state = ts.init_train_state(jax.tree.map(jnp.copy, PARAMS_S), cfg, jax.random.key(0))
        _, metrics = ts.jit_train_step(cfg)(state, everything, PARAMS_T)
        if name == "tropd":
            assert float(metrics["trust_share"]) == 0.0  # no on-policy token to count
    assert values["opd"] == pytest.approx(values["tropd"], rel=1e-6) and values["opd"] > 0
    s, st = batch.input_ids_bs.shape[1], batch.teacher_input_ids_bs.shape[1]
    ls = full_logits(PARAMS_S, STUDENT, batch.input_ids_bs, batch.attention_mask_bs)[:, s - T - 1 : s - 1]
    lt = full_logits(PARAMS_T, TEACHER, batch.teacher_input_ids_bs, batch.teacher_attention_mask_bs)[:, st - T - 1 : st - 1]
    log_s, log_t = np_log_softmax(ls), np_log_softmax(lt)
    per = np.array([[np_topk_kl(log_t[b, j, np_teacher_topk(log_t[b, j], K)],
                                log_s[b, j, np_teacher_topk(log_t[b, j], K)], "renormalized")
                     for j in range(T)] for b in range(log_s.shape[0])])
    mask = np.asarray(batch.response_mask_bt, np.float64)
    np.testing.assert_allclose(values["opd"], 0.25 * (per * mask).sum() / mask.sum(), rtol=1e-5)


def test_objective_config_errors_name_the_field():
    cases = [
        (dict(name="kl"), "objective.name: unknown objective 'kl'"),
        (dict(topk_support="tail"), "objective.topk_support: must be one of"),
        (dict(trust_threshold=0.0), r"objective.trust_threshold: must be in \(0, 1\]"),
        (dict(outlier="drop"), "objective.outlier: must be one of"),
        (dict(clip_tau=-1.0), "objective.clip_tau: must be > 0"),
        (dict(prefix_fkl_weight=-1.0), "must be >= 0"),
        (dict(name="veto", topk_support="unrenormalized"), "the veto bridge renormalises"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            objectives.ObjectiveConfig(**kwargs)


def test_registry_declarations():
    assert objectives.names() == ["opd", "sft", "tropd", "veto"]
    tropd = objectives.get("tropd")
    assert tropd.supports == ("teacher_topk", "sampled") and tropd.needs_teacher
    assert not objectives.get("sft").needs_teacher and objectives.get("veto").needs_alpha
    with pytest.raises(ValueError, match="unknown supports"):
        objectives.Objective(lambda terms, cfg: None, supports=("everything",))

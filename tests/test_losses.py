"""Tests for trb_jax.losses against the float64 NumPy and PyTorch references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from references import numpy_reference as ref
from references import torch_reference as tref
from trb_jax import losses

V = 40
K = 16


def make_logits(seed: int, rows: int, vocab: int = V, scale: float = 2.0, mask_frac: float = 0.0,
                shared_mask: bool = False):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(rows, vocab)) * scale
    t = rng.normal(size=(rows, vocab)) * scale
    if shared_mask:  # one vocabulary mask for both: every KL finite, -inf entries present
        hide = rng.random(size=s.shape) < mask_frac
        hide[:, :2] = False
        s[hide] = t[hide] = -np.inf
    elif mask_frac:
        # Masks may hide teacher tokens the student likes (-> infinite reverse KL) and
        # vice versa; each row keeps at least 2 finite entries per model.
        for arr in (s, t):
            hide = rng.random(size=arr.shape) < mask_frac
            hide[:, :2] = False
            arr[hide] = -np.inf
    return s.astype(np.float32), t.astype(np.float32)


def topk_forward(s, t, support):
    """KL(pi_T || pi_S) on the teacher's top-k from logits, through the log-prob form TrOPD uses."""
    ids = losses.topk_support(t, K)
    log_s = jnp.take_along_axis(jax.nn.log_softmax(s, axis=-1), ids, axis=-1)
    log_t = jnp.take_along_axis(jax.nn.log_softmax(t, axis=-1), ids, axis=-1)
    return losses.topk_forward_kl_from_log_probs(log_s, log_t, support=support)


# name -> (jax per-token fn(s, t), float64 per-row reference fn(s_row, t_row), grad reference)
LOSSES = {
    "topk_reverse_renorm": (
        functools.partial(losses.topk_reverse_kl, k=K, support="renormalized"),
        lambda s, t: ref.topk_reverse_kl64(s, t, K, True),
        lambda s, t: ref.grad_topk_reverse_kl64(s, t, K, True),
    ),
    "topk_reverse_plain": (
        functools.partial(losses.topk_reverse_kl, k=K, support="unrenormalized"),
        lambda s, t: ref.topk_reverse_kl64(s, t, K, False),
        lambda s, t: ref.grad_topk_reverse_kl64(s, t, K, False),
    ),
    "topk_reverse_tail": (
        functools.partial(losses.topk_reverse_kl, k=K, support="tail_bucket"),
        lambda s, t: ref.topk_reverse_kl_support64(s, t, K, "tail_bucket"),
        lambda s, t: ref.grad_topk_reverse_kl_support64(s, t, K, "tail_bucket"),
    ),
    # the whole vocabulary as the support: the full reverse KL
    "reverse_full": (
        functools.partial(losses.topk_reverse_kl, k=V, support="unrenormalized"),
        ref.reverse_kl_full64, ref.grad_reverse_kl_full64,
    ),
    "topk_forward_renorm": (
        functools.partial(topk_forward, support="renormalized"),
        lambda s, t: ref.topk_forward_kl64(s, t, K, True),
        lambda s, t: ref.grad_topk_forward_kl64(s, t, K, True),
    ),
    "topk_forward_plain": (
        functools.partial(topk_forward, support="unrenormalized"),
        lambda s, t: ref.topk_forward_kl64(s, t, K, False),
        lambda s, t: ref.grad_topk_forward_kl64(s, t, K, False),
    ),
}

TORCH_LOSSES = {
    "topk_reverse_renorm": lambda s, t: tref.torch_topk_reverse_kl(s, t, K, True),
    "topk_reverse_plain": lambda s, t: tref.torch_topk_reverse_kl(s, t, K, False),
    "topk_forward_renorm": lambda s, t: tref.torch_topk_forward_kl(s, t, K, True),
    "topk_forward_plain": lambda s, t: tref.torch_topk_forward_kl(s, t, K, False),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("mask_frac", [0.0, 0.3])
def test_loss_values_match_float64_reference(name, mask_frac):
    fn, ref_fn, _ = LOSSES[name]
    s, t = make_logits(1, rows=12, mask_frac=mask_frac)
    got = np.asarray(jax.jit(fn)(s, t))
    want = np.array([ref_fn(s[i], t[i]) for i in range(len(s))])
    assert got.shape == (12,)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_gradients_match_float64_reference(name):
    fn, _, grad_ref = LOSSES[name]
    s, t = make_logits(2, rows=6, scale=1.5)
    grad_s, grad_t = jax.grad(lambda s, t: jnp.sum(fn(s, t)), argnums=(0, 1))(s, t)
    want = np.stack([grad_ref(s[i], t[i]) for i in range(len(s))])
    np.testing.assert_allclose(np.asarray(grad_s), want, rtol=1e-4, atol=1e-6)
    # The teacher is a constant: no gradient reaches its logits.
    np.testing.assert_array_equal(np.asarray(grad_t), 0.0)


@pytest.mark.parametrize("name", sorted(TORCH_LOSSES))
def test_losses_match_independent_torch_implementation(name):
    fn, _, _ = LOSSES[name]
    s, t = make_logits(3, rows=10, vocab=64, mask_frac=0.3, shared_mask=True)
    t[0, 1] = -np.inf  # the student has mass where the teacher has none: reverse KL = +inf
    s3, t3 = s.reshape(2, 5, 64), t.reshape(2, 5, 64)
    got = np.asarray(fn(s3, t3))
    want = TORCH_LOSSES[name](torch.from_numpy(s3).double(), torch.from_numpy(t3).double()).numpy()
    assert got.shape == want.shape == (2, 5)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=2e-5, atol=2e-6)
    # Gradients with autograd (teacher detached), on rows where the loss is finite.
    # (torch's where() cannot stop inf * 0 = NaN from reaching the infinite rows' gradients.)
    g = jax.grad(lambda s: jnp.sum(jnp.where(jnp.asarray(fin), fn(s, t3), 0.0)))(s3)
    g_ref = tref.torch_student_grad(
        lambda s_, t_: torch.where(torch.from_numpy(fin), TORCH_LOSSES[name](s_, t_), 0.0),
        torch.from_numpy(s3).double(), torch.from_numpy(t3).double())
    assert fin.sum() >= 8 and not np.isnan(np.asarray(g)).any()
    np.testing.assert_allclose(np.asarray(g)[fin], g_ref.numpy()[fin], rtol=1e-4, atol=1e-6)


def test_topk_from_log_probs_equals_topk_from_logits():
    """The trainer's path (stored top-k ids + teacher log-probs) gives the same loss and grads."""
    s, t = make_logits(4, rows=8)
    ids = losses.topk_support(jnp.asarray(s), K)

    def from_stored(s):
        log_s = jnp.take_along_axis(jax.nn.log_softmax(s), ids, axis=-1)
        log_t = jnp.take_along_axis(jax.nn.log_softmax(t), ids, axis=-1)
        return jnp.sum(losses.topk_reverse_kl_from_log_probs(log_s, log_t))

    direct = lambda s: jnp.sum(losses.topk_reverse_kl(s, t, k=K))  # noqa: E731
    np.testing.assert_allclose(float(from_stored(s)), float(direct(s)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(from_stored)(s)),
                               np.asarray(jax.grad(direct)(s)), rtol=1e-5, atol=1e-7)


def test_masked_means():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 7)).astype(np.float32)
    mask = (rng.random(size=(3, 7)) < 0.6).astype(np.float32)
    mask[2] = 0.0
    x[2, 0] = np.inf  # a masked-out inf must not leak
    assert float(losses.masked_mean(x, mask)) == pytest.approx(ref.masked_mean64(x, mask), rel=1e-6)
    assert float(losses.masked_mean(x, np.zeros_like(mask))) == 0.0
    np.testing.assert_allclose(
        float(losses.masked_mean(x, mask)),
        float(tref.torch_masked_mean(torch.from_numpy(x).double(), torch.from_numpy(mask))),
        rtol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: losses.masked_mean(jnp.zeros((2, 3)), jnp.ones((2, 4))),
         r"same shape, got \(2, 3\) and \(2, 4\)"),
        (lambda: losses.topk_reverse_kl(jnp.zeros((2, 8)), jnp.zeros((2, 8)), k=9),
         r"k must be in \[1, 8\] \(the vocabulary size\), got 9"),
        (lambda: losses.topk_support(jnp.zeros((2, 8)), 0), "k must be in"),
        (lambda: losses.topk_forward_kl_from_log_probs(jnp.zeros((2, 4)), jnp.zeros((2, 4)), support="tail"),
         "support must be one of"),
    ],
)
def test_bad_input_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _all_losses_jit():
    def all_losses(s, t):
        return {name: fn(s, t) for name, (fn, _, _) in LOSSES.items()}

    return jax.jit(all_losses)


@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.01, 30.0),
    mask_frac=st.sampled_from([0.0, 0.2, 0.6]),
    same=st.booleans(),
)
def test_properties_nonnegative_zero_on_match_no_nan(seed, scale, mask_frac, same):
    s, t = make_logits(seed, rows=4, scale=scale, mask_frac=mask_frac)
    if same:
        t = s.copy()
    out = {k: np.asarray(v) for k, v in _all_losses_jit()(s, t).items()}
    for name, val in out.items():
        assert not np.isnan(val).any(), name
    # Proper divergences are >= 0 (up to float32 rounding), and 0 when the policies match.
    for name in ("topk_reverse_renorm", "reverse_full", "topk_forward_renorm"):
        assert (out[name] >= -1e-5).all(), (name, out[name])
        if same:
            np.testing.assert_allclose(out[name], 0.0, atol=1e-5)
    # Full reverse KL against the float64 reference (finite or +inf alike).
    want = np.array([ref.reverse_kl_full64(s[i], t[i]) for i in range(4)])
    np.testing.assert_array_equal(np.isinf(out["reverse_full"]), np.isinf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(out["reverse_full"][fin], want[fin], rtol=1e-4, atol=1e-5)


def test_nan_teacher_log_probs_give_a_nan_loss_not_zero():
    """A NaN input must surface (the trainer stops or skips the update), never read as 0."""
    log_s = jax.nn.log_softmax(jnp.array([[1.0, 2.0, 3.0]]))
    log_t = jnp.array([[jnp.nan, -1.0, -2.0]])
    assert np.isnan(losses.topk_reverse_kl_from_log_probs(log_s, log_t)).all()
    assert np.isnan(losses.kl_from_log_probs(log_s, log_t)).all()
    # while a teacher zero under the student's support is still +inf, not NaN
    assert losses.kl_from_log_probs(log_s, jnp.array([[-jnp.inf, -1.0, -1.0]]))[0] == jnp.inf


def _blind_spot_pair(vocab: int = 64, k: int = K, student_mass: float = 0.99,
                     teacher_mass: float = 1e-3):
    """A student with `student_mass` on its top-k; a teacher shaped like the student on those k
    tokens but with only `teacher_mass` there (the cold start TRB targets); both uniform on
    the rest."""
    rng = np.random.default_rng(0)
    shape = rng.normal(size=k)
    shape = shape - np.log(np.exp(shape).sum())
    s = np.full(vocab, np.log((1 - student_mass) / (vocab - k)))
    t = np.full(vocab, np.log((1 - teacher_mass) / (vocab - k)))
    s[:k] = shape + np.log(student_mass)
    t[:k] = shape + np.log(teacher_mass)
    return s.astype(np.float32), t.astype(np.float32)


def test_tail_bucket_sees_the_renormalised_blind_spot():
    s, t = _blind_spot_pair()
    full = ref.reverse_kl_full64(s, t)
    # 0.99 log(0.99 / 0.001) + 0.01 log(0.01 / 0.999) = 6.78 nats
    assert full == pytest.approx(0.99 * np.log(990) + 0.01 * np.log(0.01 / 0.999), rel=1e-6)
    grad = {}
    for support in losses.TOPK_SUPPORTS:
        fn = functools.partial(losses.topk_reverse_kl, k=K, support=support)
        value = float(fn(s, t))
        grad[support] = np.asarray(jax.grad(fn)(s, t))
        want = ref.topk_reverse_kl_support64(s, t, K, support)
        assert value == pytest.approx(want, rel=1e-4, abs=1e-6), support
        np.testing.assert_allclose(grad[support],
                                   ref.grad_topk_reverse_kl_support64(s, t, K, support),
                                   rtol=1e-3, atol=1e-6)
    # renormalised: blind (loss 0, gradient 0); tail bucket: ~the full KL, and a gradient
    assert float(losses.topk_reverse_kl(s, t, k=K, support="renormalized")) < 1e-5
    assert np.abs(grad["renormalized"]).max() < 1e-5
    # here the coarse-graining loses nothing (same shape on the k, both uniform off them)
    assert float(losses.topk_reverse_kl(s, t, k=K, support="tail_bucket")) == \
        pytest.approx(full, rel=1e-5)
    assert np.abs(grad["tail_bucket"]).max() > 1e-3
    # moving student mass off the top-k (the teacher's direction) lowers the tail-bucket loss
    step = s - 1e-2 * grad["tail_bucket"] / np.abs(grad["tail_bucket"]).max()
    assert float(losses.topk_reverse_kl(step, t, k=K, support="tail_bucket")) < \
        float(losses.topk_reverse_kl(s, t, k=K, support="tail_bucket"))


def test_tail_bucket_is_a_lower_bound_between_renormalised_pieces():
    s, t = make_logits(5, rows=20, vocab=V, scale=3.0)
    tail = np.asarray(losses.topk_reverse_kl(s, t, k=K, support="tail_bucket"))
    full = np.array([ref.reverse_kl_full64(s[i], t[i]) for i in range(len(s))])
    assert np.all(tail >= -1e-6) and np.all(tail <= full + 1e-5)
    # the whole vocabulary as the support: the tail is empty and every treatment is the full KL
    for support in losses.TOPK_SUPPORTS:
        np.testing.assert_allclose(losses.topk_reverse_kl(s, t, k=V, support=support), full,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="support must be one of"):
        losses.topk_reverse_kl(s, t, k=K, support="tail")

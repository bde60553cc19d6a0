"""Tests for trb_jax.sampling: exact two-level inverse-CDF sampling."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from trb_jax.sampling import BLOCK, sample_categorical

_sample = jax.jit(sample_categorical)


def _draw(log_p_v: np.ndarray, n: int, seed: int = 0, chunk: int = 250) -> np.ndarray:
    """n draws from one row, `chunk` rows per call (one compiled shape, bounded memory)."""
    keys = jax.random.split(jax.random.key(seed), n)
    rows = jnp.broadcast_to(jnp.asarray(log_p_v), (chunk, log_p_v.size))
    return np.concatenate([np.asarray(_sample(keys[i:i + chunk], rows))
                           for i in range(0, n, chunk)])


def test_frequencies_match_probabilities_chi_square():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1300).astype(np.float32) * 2  # spans 3 blocks, last one partial
    logits[rng.random(1300) < 0.3] = -np.inf
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    with np.errstate(divide="ignore"):  # log(0) = -inf marks the masked tokens
        log_p = np.log(p).astype(np.float32)
    draws = _draw(log_p, 20_000)
    assert np.all(np.isfinite(logits[draws])), "drew a token of probability 0"
    # Chi-square on the tokens with expected count >= 5, the rest pooled.
    counts = np.bincount(draws, minlength=p.size)
    big = p * draws.size >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(p[big], p[~big].sum()) * draws.size
    _, pval = stats.chisquare(obs, exp)
    assert pval > 1e-3, pval


def test_rare_tokens_of_a_qwen3_sized_row_keep_their_mass():
    """One token has mass 1/2; the other 151,935 share the rest (~3.3e-6 each): a plain float32
    cumsum would bias them; block sampling keeps the tail's total at 1/2."""
    v = 151_936
    log_p = np.full(v, np.log(0.5 / (v - 1)), np.float32)
    log_p[70_000] = np.log(0.5)
    draws = _draw(log_p, 5_000, seed=1)
    frac_top = np.mean(draws == 70_000)
    assert abs(frac_top - 0.5) < 4 * np.sqrt(0.25 / draws.size)
    tail = draws[draws != 70_000]
    # The tail is uniform over its ids: its mean id is close to the middle of the vocabulary.
    assert abs(tail.mean() - (v - 1) / 2) < 4 * (v / np.sqrt(12)) / np.sqrt(tail.size)
    assert tail.max() >= v - BLOCK  # the partial last block is reachable


def test_zero_probability_entries_are_never_drawn_and_rows_are_independent():
    log_p = np.full((3, 1100), -np.inf, np.float32)
    log_p[0, [0, 1099]] = 0.0  # first and last id only
    log_p[1, 600] = 5.0  # a point mass
    log_p[2, :] = 0.0
    keys = jax.random.split(jax.random.key(3), 3)
    tokens = np.asarray(_sample(keys, jnp.asarray(log_p)))
    assert tokens[0] in (0, 1099) and tokens[1] == 600
    # A row's draw depends only on its own key and logits, not on its batch-mates.
    alone = np.asarray(_sample(keys[2:], jnp.asarray(log_p[2:])))
    assert alone[0] == tokens[2]
    many = _draw(log_p[0], 1000, seed=4)
    assert set(np.unique(many)) == {0, 1099}

"""Exact categorical sampling over large vocabularies with two uniforms per row.

`jax.random.categorical` draws one Gumbel variate per vocabulary entry: 151,936 random numbers
per row per decoded token, which on CPU costs more than a small model's decode step. Inverse-CDF
sampling needs one uniform, but a float32 cumulative sum over 151,936 probabilities rounds away
tokens below ~1e-7 of the total. Two levels keep both cheap and exact to float32 relative
precision: pick a block of `BLOCK` tokens by its mass (a cumsum over ~300 block masses), then a
token inside the block (a cumsum over `BLOCK` entries).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["BLOCK", "sample_categorical"]

BLOCK = 512


def _inverse_cdf(weights_bn: jax.Array, u_b: jax.Array) -> jax.Array:
    """Index i with cum[i-1] <= u * total < cum[i]: never an entry of zero weight."""
    cum_bn = jnp.cumsum(weights_bn, axis=-1)
    target_b1 = (u_b * cum_bn[:, -1])[:, None]
    idx_b = jnp.sum(cum_bn <= target_b1, axis=-1)
    # Rounding can put the target at or past the last cumulative value: fall back to the last
    # entry with positive weight.
    n = weights_bn.shape[-1]
    last_pos_b = n - 1 - jnp.argmax(weights_bn[:, ::-1] > 0, axis=-1)
    return jnp.minimum(idx_b, last_pos_b).astype(jnp.int32)


def sample_categorical(keys_b: jax.Array, log_p_bv: jax.Array) -> jax.Array:
    """One token id per row from softmax(log_p_bv) (unnormalised log-probs or logits work).

    keys_b: [b] PRNG keys (one per row, so a row's draw does not depend on its batch-mates).
    log_p_bv: [b, v] float; -inf entries are never drawn. Each row needs a finite entry.
    Returns int32 [b].
    """
    b, v = log_p_bv.shape
    x_bv = log_p_bv.astype(jnp.float32)
    m_b1 = jnp.max(x_bv, axis=-1, keepdims=True)
    p_bv = jnp.exp(x_bv - m_b1)  # max entry is 1: no overflow, relative precision kept
    n_blocks = -(-v // BLOCK)
    p_bnk = jnp.pad(p_bv, ((0, 0), (0, n_blocks * BLOCK - v))).reshape(b, n_blocks, BLOCK)
    u_b2 = jax.vmap(lambda k: jax.random.uniform(k, (2,), jnp.float32))(keys_b)
    block_b = _inverse_cdf(jnp.sum(p_bnk, axis=-1), u_b2[:, 0])
    in_block_bk = jnp.take_along_axis(p_bnk, block_b[:, None, None], axis=1)[:, 0, :]
    offset_b = _inverse_cdf(in_block_bk, u_b2[:, 1])
    return block_b * BLOCK + offset_b

"""Causal grouped-query attention behind one interface; the implementation is chosen by name.

  self_attention(q_btnh, k_btkh, v_btkh, valid_bt, *, impl, block_size) -> out_btnh
  decode_attention(q_bnh, k_lbskh, v_lbskh, layer, valid_bs, length, *, impl, block_size) -> out_bnh

`impl` is `Qwen3Config.attention` (the run config's `model.attention`):

  "xla"        the reference: einsum scores [b, k, g, t, s] in float32, masked softmax. Memory
               O(t * s) per head, forward and backward.
  "blockwise"  pure-JAX flash attention: online softmax over key blocks, a custom VJP that
               recomputes each block's probabilities from the saved log-sum-exp, so forward and
               backward keep O(t * block) temporaries and O(t) residuals. Key blocks above the
               causal diagonal are never visited.
  "cudnn"      cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16).
  "splash"     the TPU Pallas splash-attention kernel JAX ships (causal mask + segment ids).
  "auto"       splash on TPU; cudnn on GPU for bf16/fp16 with a supported head_dim, else
               blockwise; on CPU blockwise once the sequence is longer than one block, else xla
               (one block is the reference's memory, and the einsum is faster there).

Masks: query t sees key s iff s <= t (causal) and `valid[b, s]` (left padding: 1 = real token).
A query that sees no key (a left-padding slot) gets a finite output: the reference keeps its
uniform average over all keys, the other implementations return 0 there. Either way the value
is never read by a real token, so no loss over real tokens depends on it.

Numerics (all implementations): scores, softmax statistics and accumulators in float32; the
probabilities are cast to the value dtype for the value product; the result has q's dtype.

Decode: one query per row against the cache of one layer. `decode_attention` reads only the key
blocks below `length` (a `lax.fori_loop` with a traced trip count), so a step costs what the
filled part of the cache costs, not cache_len; with impl="xla" it attends over every slot
(the reference). Neither retraces when `length` changes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from trb_jax.sharding import logical_to_spec

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")

DEFAULT_BLOCK_SIZE = 512  # query and key block of "blockwise" (and of the decode loop)

# Softmax input for masked keys in the reference. Finite (not -inf) so that a query with no
# visible key gets a uniform, finite distribution instead of NaN.
_MASKED_SCORE = float(jnp.finfo(jnp.float32).min)


def check_implementation(impl: str) -> None:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention={impl!r}; expected one of {list(IMPLEMENTATIONS)}")


def resolve(impl: str, *, seq_len: int, head_dim: int, dtype, block_size: int = DEFAULT_BLOCK_SIZE,
            backend: str | None = None) -> str:
    """The concrete implementation "auto" stands for on `backend` (default: JAX's) and shape."""
    check_implementation(impl)
    if impl != "auto":
        return impl
    if backend is None:
        backend = jax.default_backend()
        if backend == "gpu" and "rocm" in jax.devices()[0].client.platform_version.lower():
            backend = "rocm"
    if backend == "tpu":
        return "splash"
    if backend in ("gpu", "cuda", "rocm"):
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        if backend != "rocm" and half and head_dim % 8 == 0 and head_dim <= 128:
            return "cudnn"
        return "blockwise"
    return "blockwise" if seq_len > block_size else "xla"


# ---------------------------------------------------------------------------------------------
# Reference


def masked_attention(q_btnh, k_bskh, v_bskh, mask_bts) -> jax.Array:
    """Reference grouped-query softmax attention with an explicit mask [b, t, s] (True = attend).

    Query head i reads KV head i // (n // k). Scores [b, k, g, t, s] and softmax are float32.
    """
    b, t, n, h = q_btnh.shape
    num_kv = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, num_kv, n // num_kv, h)
    scores_bkgts = jnp.einsum(
        "btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32
    ) * (h**-0.5)
    scores_bkgts = jnp.where(mask_bts[:, None, None, :, :], scores_bkgts, _MASKED_SCORE)
    probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bskh.dtype)
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_bskh)
    return out_btkgh.reshape(b, t, n, h)


def causal_mask(valid_bt: jax.Array) -> jax.Array:
    """[b, t, t] bool: causal AND key is a real token."""
    t = valid_bt.shape[-1]
    causal_ts = jnp.tril(jnp.ones((t, t), dtype=bool))
    return causal_ts[None] & valid_bt.astype(bool)[:, None, :]


def xla_attention(q_btnh, k_btkh, v_btkh, valid_bt) -> jax.Array:
    """The reference: `masked_attention` with the causal + padding mask materialised."""
    return masked_attention(q_btnh, k_btkh, v_btkh, causal_mask(valid_bt))


# ---------------------------------------------------------------------------------------------
# Blockwise (flash-style) attention in pure JAX


def _block(x, i, size, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _block_mask(valid_bs, qi, kj, size):
    """[b, 1, 1, q, s] mask of query block qi against key block kj (causal and key valid)."""
    q_pos = qi * size + jnp.arange(size)
    k_pos = kj * size + jnp.arange(size)
    causal_qs = q_pos[:, None] >= k_pos[None, :]
    return causal_qs[None, None, None] & _block(valid_bs, kj, size)[:, None, None, None, :]


def _scores(q_bqkgh, k_bskh, mask, scale):
    s = jnp.einsum("bqkgh,bskh->bkgqs", q_bqkgh, k_bskh, preferred_element_type=jnp.float32)
    return jnp.where(mask, s * scale, -jnp.inf)


def _flash_forward(q_btkgh, k_btkh, v_btkh, valid_bt, size):
    """Blocked online softmax; returns (out [b, t, k, g, h] in q's dtype, lse [b, k, g, t] f32).

    lse is 0 for a query with no visible key (its output is 0), so the backward's
    exp(s - lse) is exp(-inf) = 0 there rather than NaN.
    """
    b, t, kh, g, h = q_btkgh.shape
    nb = t // size
    scale = h**-0.5

    def q_block(_, qi):
        q_i = _block(q_btkgh, qi, size)

        def k_step(kj, carry):
            m, l, acc = carry
            s = _scores(q_i, _block(k_btkh, kj, size), _block_mask(valid_bt, qi, kj, size), scale)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v_btkh.dtype), _block(v_btkh, kj, size),
                            preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv

        init = (jnp.full((b, kh, g, size), -jnp.inf, jnp.float32),
                jnp.zeros((b, kh, g, size), jnp.float32),
                jnp.zeros((b, kh, g, size, h), jnp.float32))
        # Key blocks 0..qi only: blocks above the causal diagonal are never read.
        m, l, acc = jax.lax.fori_loop(0, qi + 1, k_step, init)
        empty = l == 0.0
        out = acc / jnp.where(empty, 1.0, l)[..., None]
        lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))
        return None, (jnp.moveaxis(out, 3, 1).astype(q_btkgh.dtype), lse)

    _, (out_nbqkgh, lse_nbkgq) = jax.lax.scan(q_block, None, jnp.arange(nb))
    out = jnp.moveaxis(out_nbqkgh, 0, 1).reshape(b, t, kh, g, h)
    lse = jnp.moveaxis(lse_nbkgq, 0, 3).reshape(b, kh, g, t)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_btkgh, k_btkh, v_btkh, valid_bt, size):
    return _flash_forward(q_btkgh, k_btkh, v_btkh, valid_bt, size)[0]


def _flash_fwd(q_btkgh, k_btkh, v_btkh, valid_bt, size):
    out, lse = _flash_forward(q_btkgh, k_btkh, v_btkh, valid_bt, size)
    # Residuals are O(t): inputs, output and the log-sum-exp; no [t, s] array is saved.
    return out, (q_btkgh, k_btkh, v_btkh, valid_bt, out, lse)


def _flash_bwd(size, res, dout_btkgh):
    """FlashAttention-2 backward: per key block, loop over the query blocks at or below the
    diagonal, recompute p = exp(s - lse), accumulate dk, dv for the block and dq in place."""
    q_btkgh, k_btkh, v_btkh, valid_bt, out, lse = res
    b, t, kh, g, h = q_btkgh.shape
    nb = t // size
    scale = h**-0.5
    delta_bkgt = jnp.einsum("btkgh,btkgh->bkgt", dout_btkgh.astype(jnp.float32), out.astype(jnp.float32))

    def k_block(dq_acc, kj):
        k_j, v_j = _block(k_btkh, kj, size), _block(v_btkh, kj, size)

        def q_step(qi, carry):
            dq_acc, dk_j, dv_j = carry
            q_i, do_i = _block(q_btkgh, qi, size), _block(dout_btkgh, qi, size)
            s = _scores(q_i, k_j, _block_mask(valid_bt, qi, kj, size), scale)
            p = jnp.exp(s - _block(lse, qi, size, axis=3)[..., None])
            dv_j = dv_j + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(do_i.dtype), do_i,
                                     preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgh,bskh->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - _block(delta_bkgt, qi, size, axis=3)[..., None]) * scale
            dq_i = jnp.einsum("bkgqs,bskh->bqkgh", ds.astype(k_j.dtype), k_j,
                              preferred_element_type=jnp.float32)
            dq_acc = jax.lax.dynamic_update_slice_in_dim(
                dq_acc, _block(dq_acc, qi, size) + dq_i, qi * size, axis=1)
            dk_j = dk_j + jnp.einsum("bkgqs,bqkgh->bskh", ds.astype(q_i.dtype), q_i,
                                     preferred_element_type=jnp.float32)
            return dq_acc, dk_j, dv_j

        zeros = jnp.zeros((b, size, kh, h), jnp.float32)
        dq_acc, dk_j, dv_j = jax.lax.fori_loop(kj, nb, q_step, (dq_acc, zeros, zeros))
        return dq_acc, (dk_j, dv_j)

    dq, (dk_nb, dv_nb) = jax.lax.scan(k_block, jnp.zeros(q_btkgh.shape, jnp.float32), jnp.arange(nb))
    dk = jnp.moveaxis(dk_nb, 0, 1).reshape(k_btkh.shape)
    dv = jnp.moveaxis(dv_nb, 0, 1).reshape(v_btkh.shape)
    return (dq.astype(q_btkgh.dtype), dk.astype(k_btkh.dtype), dv.astype(v_btkh.dtype), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q_btnh, k_btkh, v_btkh, valid_bt, *, block_size: int = DEFAULT_BLOCK_SIZE):
    """Flash-style causal attention in pure JAX; same contract as `xla_attention`, except that a
    query with no visible key returns 0. Temporaries O(t * block_size), residuals O(t)."""
    b, t, n, h = q_btnh.shape
    kh = k_btkh.shape[2]
    size = min(block_size, t)
    tp = -(-t // size) * size
    pad = tp - t
    valid_bt = valid_bt.astype(bool)
    if pad:  # the tail is masked as keys and sliced off as queries
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q_btnh, k_btkh, v_btkh = (jnp.pad(x, widths) for x in (q_btnh, k_btkh, v_btkh))
        valid_bt = jnp.pad(valid_bt, ((0, 0), (0, pad)))
    out = _flash(q_btnh.reshape(b, tp, kh, n // kh, h), k_btkh, v_btkh, valid_bt, size)
    return out.reshape(b, tp, n, h)[:, :t]


# ---------------------------------------------------------------------------------------------
# Accelerator kernels


def _left_to_right_padding(valid_bt):
    """Per-row gather indices that move a left-padded row's real tokens to the front."""
    t = valid_bt.shape[-1]
    length_b = jnp.sum(valid_bt.astype(jnp.int32), axis=-1)
    shift_b = t - length_b
    idx_bt = (jnp.arange(t)[None] + shift_b[:, None]) % t
    inverse_bt = (jnp.arange(t)[None] - shift_b[:, None]) % t
    return idx_bt, inverse_bt, length_b


def _take_rows(x_bt__, idx_bt):
    return jnp.take_along_axis(x_bt__, idx_bt.reshape(idx_bt.shape + (1,) * (x_bt__.ndim - 2)), axis=1)


def cudnn_attention(q_btnh, k_btkh, v_btkh, valid_bt) -> jax.Array:
    """cuDNN flash attention (GPU only, bf16/fp16).

    cuDNN's padding mask is right padding (sequence lengths), so each row is rotated to put its
    real tokens first (RoPE is already applied; rotation keeps their order), run with
    PADDING_CAUSAL, and rotated back. Requires left padding: each row's real tokens are a
    suffix, as the model's prompts are. Padding queries return 0.
    """
    return _right_padded_attention(q_btnh, k_btkh, v_btkh, valid_bt, implementation="cudnn")


def _right_padded_attention(q_btnh, k_btkh, v_btkh, valid_bt, *, implementation: str):
    """`jax.nn.dot_product_attention` with PADDING_CAUSAL on rows rotated to right padding
    ("xla" runs the same semantics on CPU, which is how the rotation is tested)."""
    idx_bt, inverse_bt, length_b = _left_to_right_padding(valid_bt)
    q, k, v = (_take_rows(x, idx_bt) for x in (q_btnh, k_btkh, v_btkh))
    out = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=length_b, key_value_seq_lengths=length_b,
        implementation=implementation,
    )
    out = _take_rows(out, inverse_bt)
    return jnp.where(valid_bt.astype(bool)[:, :, None, None], out, jnp.zeros((), out.dtype))


def splash_attention(q_btnh, k_btkh, v_btkh, valid_bt, *, block_size: int = DEFAULT_BLOCK_SIZE,
                     interpret: bool = False) -> jax.Array:
    """The TPU splash-attention Pallas kernel (`interpret=True` runs it anywhere, slowly).

    Left padding is expressed with segment ids (real tokens 1, padding 0, the 128-alignment
    tail 2) and a causal mask, so no row is empty: a padding query attends to the padding
    before it; its output is then zeroed. GQA runs the MQA kernel once per KV head. Under a
    mesh (`jax.set_mesh`) the kernel runs in `shard_map` over the rows' and KV heads' mesh axes
    of the sharding table (a Pallas call is not partitioned automatically).
    """
    b, t, n, h = q_btnh.shape
    kh = k_btkh.shape[2]
    tp = -(-t // 128) * 128
    size = math.gcd(tp, max(128, min(block_size, tp)))
    valid_bt = valid_bt.astype(bool)
    seg_bt = jnp.pad(valid_bt.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=2)
    widths = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    q = (q_btnh.astype(jnp.float32) * h**-0.5).astype(q_btnh.dtype)  # splash does not scale
    q_btkgh = jnp.pad(q, widths).reshape(b, tp, kh, n // kh, h)
    k_btkh, v_btkh = (jnp.pad(x, widths) for x in (k_btkh, v_btkh))
    local = functools.partial(_splash_local, size=size, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        spec_q = logical_to_spec(("batch", None, "kv_heads", None, None), q_btkgh.shape, dict(mesh.shape))
        spec_kv = jax.sharding.PartitionSpec(*spec_q[:3], None)
        spec_seg = jax.sharding.PartitionSpec(spec_q[0], None)
        local = jax.shard_map(local, mesh=mesh, in_specs=(spec_q, spec_kv, spec_kv, spec_seg),
                              out_specs=spec_q, check_vma=False)
    out = local(q_btkgh, k_btkh, v_btkh, seg_bt)
    out = out.reshape(b, tp, n, h)[:, :t].astype(q_btnh.dtype)
    return jnp.where(valid_bt[:, :, None, None], out, jnp.zeros((), out.dtype))


def _splash_local(q_btkgh, k_btkh, v_btkh, seg_bt, *, size: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    tp, g = q_btkgh.shape[1], q_btkgh.shape[3]
    blocks = splash.BlockSizes(block_q=size, block_kv=size, block_kv_compute=size,
                               block_q_dkv=size, block_kv_dkv=size, block_kv_dkv_compute=size,
                               block_q_dq=size, block_kv_dq=size)
    mask = splash.MultiHeadMask([splash.CausalMask((tp, tp))] * g)
    kernel = splash.make_splash_mqa_single_device(mask, block_sizes=blocks, interpret=interpret)

    def one_row(q_kgth, k_kth, v_kth, seg_t):
        ids = splash.SegmentIds(q=seg_t, kv=seg_t)
        return jax.vmap(lambda q_, k_, v_: kernel(q_, k_, v_, segment_ids=ids))(q_kgth, k_kth, v_kth)

    out_bkgth = jax.vmap(one_row)(q_btkgh.transpose(0, 2, 3, 1, 4), k_btkh.transpose(0, 2, 1, 3),
                                  v_btkh.transpose(0, 2, 1, 3), seg_bt)
    return out_bkgth.transpose(0, 3, 1, 2, 4)


# ---------------------------------------------------------------------------------------------
# The interface


def self_attention(q_btnh, k_btkh, v_btkh, valid_bt, *, impl: str = "auto",
                   block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
    """Causal self-attention over a left-padded batch -> [b, t, n, h] in q's dtype.

    q [b, t, n, h], k and v [b, t, k, h] (n a multiple of k; query head i reads KV head
    i // (n // k)), valid_bt [b, t] (1/True = real token). `impl` is resolved by `resolve`.
    """
    impl = resolve(impl, seq_len=q_btnh.shape[1], head_dim=q_btnh.shape[-1], dtype=q_btnh.dtype,
                   block_size=block_size)
    if impl == "xla":
        return xla_attention(q_btnh, k_btkh, v_btkh, valid_bt)
    if impl == "blockwise":
        return blockwise_attention(q_btnh, k_btkh, v_btkh, valid_bt, block_size=block_size)
    if impl == "cudnn":
        return cudnn_attention(q_btnh, k_btkh, v_btkh, valid_bt)
    return splash_attention(q_btnh, k_btkh, v_btkh, valid_bt, block_size=block_size)


def decode_attention(q_bnh, k_lbskh, v_lbskh, layer, valid_bs, length, *, impl: str = "auto",
                     block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
    """One query per row against layer `layer` of a stacked cache -> [b, n, h] in q's dtype.

    k_lbskh, v_lbskh: [layers, b, cache_len, k, h]; valid_bs [b, cache_len] (True = the slot
    holds a real token); length: traced int, slots >= length are never read (they must also be
    invalid). With impl="xla" every slot is read (the reference); otherwise only the key blocks
    below `length`, in a loop whose trip count is traced (no retrace as length grows).
    """
    check_implementation(impl)
    b, n, h = q_bnh.shape
    _, _, cache_len, kh, _ = k_lbskh.shape
    g = n // kh
    q_bkgh = q_bnh.reshape(b, kh, g, h)
    if impl == "xla":
        k_bskh = k_lbskh[layer].astype(q_bnh.dtype)
        v_bskh = v_lbskh[layer].astype(q_bnh.dtype)
        return masked_attention(q_bnh[:, None], k_bskh, v_bskh, valid_bs[:, None, :])[:, 0]

    size = min(block_size, cache_len)
    scale = h**-0.5
    cache_dtype = k_lbskh.dtype
    if cache_dtype == jnp.bfloat16:
        # The loop reads the cache as raw 16-bit words and reinterprets each block: XLA:CPU
        # computes bf16 dots in f32 and would otherwise hoist an f32 convert of the whole
        # stacked cache out of the loop (an O(cache) copy per layer). A bitcast costs nothing.
        k_lbskh, v_lbskh = (jax.lax.bitcast_convert_type(x, jnp.uint16) for x in (k_lbskh, v_lbskh))

    def k_step(j, carry):
        m, l, acc = carry
        # The last block may run past cache_len: slide it back (dynamic_slice would anyway)
        # and mask the keys an earlier block already covered.
        start = jnp.minimum(j * size, cache_len - size)
        k_j = jax.lax.dynamic_slice(k_lbskh, (layer, 0, start, 0, 0), (1, b, size, kh, h))[0]
        v_j = jax.lax.dynamic_slice(v_lbskh, (layer, 0, start, 0, 0), (1, b, size, kh, h))[0]
        if k_j.dtype != cache_dtype:
            k_j, v_j = (jax.lax.bitcast_convert_type(x, cache_dtype) for x in (k_j, v_j))
        pos_s = start + jnp.arange(size)
        mask_bs = (jax.lax.dynamic_slice_in_dim(valid_bs, start, size, axis=1)
                   & (pos_s >= j * size)[None] & (pos_s < length)[None])
        s = jnp.einsum("bkgh,bskh->bkgs", q_bkgh, k_j.astype(q_bnh.dtype),
                       preferred_element_type=jnp.float32) * scale
        s = jnp.where(mask_bs[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        pv = jnp.einsum("bkgs,bskh->bkgh", p.astype(q_bnh.dtype), v_j.astype(q_bnh.dtype),
                        preferred_element_type=jnp.float32)
        return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv

    init = (jnp.full((b, kh, g), -jnp.inf, jnp.float32), jnp.zeros((b, kh, g), jnp.float32),
            jnp.zeros((b, kh, g, h), jnp.float32))
    num_blocks = (length + size - 1) // size
    _, l, acc = jax.lax.fori_loop(0, num_blocks, k_step, init)
    out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]
    return out.reshape(b, n, h).astype(q_bnh.dtype)

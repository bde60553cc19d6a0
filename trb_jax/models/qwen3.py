"""Qwen3 dense decoder as pure functions over a params pytree.

Parameters are a nested dict of arrays (layout in `param_logical_axes`); the static
`Qwen3Config` is passed alongside. Every entry point is a pure, jittable function with the
config static:

  forward(params, config, input_ids_bt, attention_mask_bt=None) -> logits_btv  (float32)
  prefill(params, config, input_ids_bt, attention_mask_bt, cache_len) -> (logits_bv, KVCache)
  decode_step(params, config, token_b, cache) -> (logits_bv, KVCache)

`Qwen3CausalLM` bundles (config, params) into a callable pytree for convenience.

Shape letters: b batch, t query time, s key/cache time, d model, n query heads, k KV heads,
g query heads per KV head (n = k * g), h head dim, f MLP hidden, v vocab, l layers.
Decoder-layer parameters are stacked on a leading layer axis and iterated with `lax.scan`,
so the names under params["layers"] give the per-layer shape.

Numerics mirror transformers' Qwen3 (modeling_qwen3.py) so that bf16 results match too:
RMSNorm normalises in float32, casts back to the activation dtype, *then* multiplies the weight;
RoPE's cos/sin are computed in float32 and cast to the activation dtype; attention scores and
softmax are float32; logits come out of the LM-head dot in float32 (bf16 operands, float32
accumulation and result: never rounded to bf16).

Attention itself lives in `trb_jax.models.attention` (reference einsum, blockwise/flash, cuDNN,
TPU splash), chosen by `Qwen3Config.attention`; this file only builds q, k, v and the masks'
inputs (which tokens are real, and for decode how many cache slots are filled).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from trb_jax.models import attention as attention_lib
from trb_jax.sharding import LOGICAL_AXIS_RULES, MeshAxes, constrain, tree_shardings

Params = dict[str, Any]

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Static architecture and dtype policy of a Qwen3 dense model (hashable: a jit static arg).

    param_dtype is the storage dtype of the weights; compute_dtype is the dtype of activations
    and matmul inputs (weights are cast to it at use). Both are "float32" or "bfloat16".
    attention names the attention implementation (`attention.IMPLEMENTATIONS`: "auto", "xla",
    "blockwise", "cudnn", "splash"); attention_block_size is the query/key block of the
    blockwise path and of the length-bounded decode loop. Neither changes the architecture.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    attention: str = "auto"
    attention_block_size: int = attention_lib.DEFAULT_BLOCK_SIZE

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for field in ("param_dtype", "compute_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{field}={getattr(self, field)!r}; expected one of {list(DTYPES)}")
        attention_lib.check_implementation(self.attention)
        if self.attention_block_size < 1:
            raise ValueError(f"attention_block_size={self.attention_block_size} must be >= 1")

    def with_dtype(self, param_dtype: str, compute_dtype: str | None = None) -> Qwen3Config:
        """The same architecture with a new dtype policy (compute defaults to param dtype)."""
        return dataclasses.replace(
            self, param_dtype=param_dtype, compute_dtype=compute_dtype or param_dtype
        )


def _preset(hidden, layers, heads, inter, tied) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=151936,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=inter,
        tie_word_embeddings=tied,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
    )


# Published Qwen3 dense configs (config.json of Qwen/Qwen3-*), float32 dtype policy by default;
# use `.with_dtype("bfloat16")` for the released precision.
qwen3_0p6b = _preset(1024, 28, 16, 3072, tied=True)
qwen3_1p7b = _preset(2048, 28, 16, 6144, tied=True)
qwen3_4b = _preset(2560, 36, 32, 9728, tied=True)
qwen3_8b = _preset(4096, 36, 32, 12288, tied=False)
qwen3_14b = _preset(5120, 40, 40, 17408, tied=False)
qwen3_32b = _preset(5120, 64, 64, 25600, tied=False)

PRESETS: dict[str, Qwen3Config] = {
    "qwen3_0p6b": qwen3_0p6b,
    "qwen3_1p7b": qwen3_1p7b,
    "qwen3_4b": qwen3_4b,
    "qwen3_8b": qwen3_8b,
    "qwen3_14b": qwen3_14b,
    "qwen3_32b": qwen3_32b,
}


# ---------------------------------------------------------------------------------------------
# Parameters


def param_logical_axes(config: Qwen3Config) -> Params:
    """Logical axis names per parameter; the same tree structure as `init_params`' output."""
    layer = ("layers",)
    axes: Params = {
        "embed_vd": ("vocab", "embed"),
        "layers": {
            "attn_norm_d": layer + ("norm",),
            "q_dnh": layer + ("embed", "heads", "head_dim"),
            "k_dkh": layer + ("embed", "kv_heads", "head_dim"),
            "v_dkh": layer + ("embed", "kv_heads", "head_dim"),
            "o_nhd": layer + ("heads", "head_dim", "embed"),
            "q_norm_h": layer + ("head_dim",),
            "k_norm_h": layer + ("head_dim",),
            "mlp_norm_d": layer + ("norm",),
            "gate_df": layer + ("embed", "mlp"),
            "up_df": layer + ("embed", "mlp"),
            "down_fd": layer + ("mlp", "embed"),
        },
        "final_norm_d": ("norm",),
    }
    if not config.tie_word_embeddings:
        axes["lm_head_dv"] = ("embed", "vocab")
    return axes


def param_shapes(config: Qwen3Config) -> Params:
    """Shape tuple per parameter; the same tree structure as `init_params`' output."""
    c = config
    L, d, n, k, h, f, v = (
        c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
        c.intermediate_size, c.vocab_size,
    )  # fmt: skip
    shapes: Params = {
        "embed_vd": (v, d),
        "layers": {
            "attn_norm_d": (L, d),
            "q_dnh": (L, d, n, h),
            "k_dkh": (L, d, k, h),
            "v_dkh": (L, d, k, h),
            "o_nhd": (L, n, h, d),
            "q_norm_h": (L, h),
            "k_norm_h": (L, h),
            "mlp_norm_d": (L, d),
            "gate_df": (L, d, f),
            "up_df": (L, d, f),
            "down_fd": (L, f, d),
        },
        "final_norm_d": (d,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head_dv"] = (d, v)
    return shapes


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def param_shardings(
    config: Qwen3Config, mesh: Mesh, *, rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES
) -> Params:
    """NamedShardings of a params pytree for `config` (from shapes only, no memory).

    rules: the logical-axis table (trb_jax.sharding); INFERENCE_AXIS_RULES for inference-only
    weights such as the teacher.
    """
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), param_shapes(config),
                          is_leaf=_is_shape)
    return tree_shardings(param_logical_axes(config), mesh, shapes, rules=rules)


def init_params(config: Qwen3Config, rng: jax.Array, dtype: Any = None) -> Params:
    """Random parameters as transformers initialises Qwen3: N(0, 0.02) matrices, unit norms.

    dtype defaults to config.param_dtype. Use under `jax.eval_shape` for shapes without memory.
    """
    dtype = DTYPES[config.param_dtype] if dtype is None else dtype
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(shapes, is_leaf=_is_shape)[0]]
    keys = jax.random.split(rng, len(leaves))
    out = []
    for path, shape, key in zip(paths, leaves, keys):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        else:
            out.append((0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


def num_params(config: Qwen3Config) -> int:
    """Total parameter count (a tied embedding counted once), from shapes only."""
    abstract = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    return sum(x.size for x in jax.tree.leaves(abstract))


# ---------------------------------------------------------------------------------------------
# Components


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMS-normalise the last axis in float32; returns x's dtype (HF Qwen3RMSNorm order)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_cos_sin(positions_bt: jax.Array, head_dim: int, theta: float, dtype: Any):
    """cos, sin [b, t, h] for integer positions; computed in float32, returned in `dtype`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_bt = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    emb_bth = jnp.concatenate([freqs_bt, freqs_bt], axis=-1)
    return jnp.cos(emb_bth).astype(dtype), jnp.sin(emb_bth).astype(dtype)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the GPT-NeoX/HF convention) over the head axis of x [b, t, heads, h]."""
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    return x_btnh * cos_bth[:, :, None, :] + rotated * sin_bth[:, :, None, :]


def positions_from_mask(attention_mask_bt: jax.Array) -> jax.Array:
    """Token positions that ignore left padding: cumsum(mask) - 1, clipped at 0."""
    return jnp.maximum(jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


def project_qkv(lp: Params, config: Qwen3Config, x_btd: jax.Array, positions_bt: jax.Array):
    """q [b,t,n,h], k and v [b,t,k,h] for one layer: projection, per-head RMSNorm, RoPE."""
    dt = x_btd.dtype
    q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, lp["q_dnh"].astype(dt))
    k_btkh = jnp.einsum("btd,dkh->btkh", x_btd, lp["k_dkh"].astype(dt))
    v_btkh = jnp.einsum("btd,dkh->btkh", x_btd, lp["v_dkh"].astype(dt))
    q_btnh = rms_norm(q_btnh, lp["q_norm_h"], config.rms_norm_eps)
    k_btkh = rms_norm(k_btkh, lp["k_norm_h"], config.rms_norm_eps)
    cos_bth, sin_bth = rope_cos_sin(positions_bt, config.head_dim, config.rope_theta, dt)
    q_btnh = constrain(apply_rope(q_btnh, cos_bth, sin_bth), ("batch", "length", "heads", "head_dim"))
    k_btkh = constrain(apply_rope(k_btkh, cos_bth, sin_bth), ("batch", "length", "kv_heads", "head_dim"))
    v_btkh = constrain(v_btkh, ("batch", "length", "kv_heads", "head_dim"))
    return q_btnh, k_btkh, v_btkh


# The reference attention with an explicit [b, t, s] mask (see `attention.masked_attention`).
dot_product_attention = attention_lib.masked_attention


def self_attention(config: Qwen3Config, q_btnh, k_btkh, v_btkh, valid_bt) -> jax.Array:
    """Causal attention over real tokens with the config's implementation -> [b, t, n, h]."""
    return attention_lib.self_attention(
        q_btnh, k_btkh, v_btkh, valid_bt, impl=config.attention, block_size=config.attention_block_size
    )


def mlp(lp: Params, x_btd: jax.Array) -> jax.Array:
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    dt = x_btd.dtype
    gate_btf = jnp.einsum("btd,df->btf", x_btd, lp["gate_df"].astype(dt))
    up_btf = jnp.einsum("btd,df->btf", x_btd, lp["up_df"].astype(dt))
    hidden_btf = constrain(jax.nn.silu(gate_btf) * up_btf, ("batch", "length", "mlp"))
    return jnp.einsum("btf,fd->btd", hidden_btf, lp["down_fd"].astype(dt))


def _decoder_layer(lp, config, x_btd, positions_bt, attend):
    """Pre-norm residual block; `attend(q, k, v) -> (out_btnh, aux)` decides what keys it sees."""
    h_btd = rms_norm(x_btd, lp["attn_norm_d"], config.rms_norm_eps)
    q_btnh, k_btkh, v_btkh = project_qkv(lp, config, h_btd, positions_bt)
    out_btnh, aux = attend(q_btnh, k_btkh, v_btkh)
    x_btd = x_btd + jnp.einsum("btnh,nhd->btd", out_btnh, lp["o_nhd"].astype(x_btd.dtype))
    h_btd = rms_norm(x_btd, lp["mlp_norm_d"], config.rms_norm_eps)
    x_btd = constrain(x_btd + mlp(lp, h_btd), ("batch", "length", "act_embed"))
    return x_btd, aux


def attention(lp, config, x_btd, positions_bt, valid_bt) -> jax.Array:
    """Causal self-attention sublayer of one layer (no residual, no input norm) -> [b, t, d].

    valid_bt [b, t]: 1/True = real token (keys that are not real are masked)."""
    q_btnh, k_btkh, v_btkh = project_qkv(lp, config, x_btd, positions_bt)
    out_btnh = self_attention(config, q_btnh, k_btkh, v_btkh, valid_bt)
    return jnp.einsum("btnh,nhd->btd", out_btnh, lp["o_nhd"].astype(x_btd.dtype))


def decoder_layer(lp, config, x_btd, positions_bt, valid_bt) -> jax.Array:
    """One causal decoder layer over a full sequence; valid_bt [b, t] marks the real tokens."""
    attend = lambda q, k, v: (self_attention(config, q, k, v, valid_bt), None)  # noqa: E731
    return _decoder_layer(lp, config, x_btd, positions_bt, attend)[0]


def layer_params(params: Params, i: int) -> Params:
    """The parameters of decoder layer i (unstacked)."""
    return jax.tree.map(lambda a: a[i], params["layers"])


def embed(params: Params, config: Qwen3Config, input_ids_bt: jax.Array) -> jax.Array:
    # Gather the table's "embed" (fsdp) shards first: the looked-up rows are batch-sharded over
    # fsdp, and a gather cannot move a dimension between mesh axes without a full rematerialise.
    table_vd = constrain(params["embed_vd"], ("vocab", None))
    x_btd = jnp.take(table_vd, input_ids_bt, axis=0)
    return constrain(x_btd.astype(DTYPES[config.compute_dtype]), ("batch", "length", "act_embed"))


def unembed(params: Params, config: Qwen3Config, x_btd: jax.Array) -> jax.Array:
    """Final RMSNorm and LM head; float32 logits [b, t, v]."""
    x_btd = rms_norm(x_btd, params["final_norm_d"], config.rms_norm_eps)
    dt = x_btd.dtype
    # float32 straight out of the dot: bf16 logits would step by 0.125 nats at |logit| 16-32,
    # which quantises the blend's r = log pi_T - log pi_S and the sampler's probabilities.
    if config.tie_word_embeddings:
        logits_btv = jnp.einsum("btd,vd->btv", x_btd, params["embed_vd"].astype(dt),
                                preferred_element_type=jnp.float32)
    else:
        logits_btv = jnp.einsum("btd,dv->btv", x_btd, params["lm_head_dv"].astype(dt),
                                preferred_element_type=jnp.float32)
    return constrain(logits_btv, ("batch", "length", "vocab"))


# ---------------------------------------------------------------------------------------------
# Full forward


def hidden_states(
    params: Params,
    config: Qwen3Config,
    input_ids_bt: jax.Array,
    attention_mask_bt: jax.Array | None = None,
    *,
    remat: bool = False,
) -> jax.Array:
    """Last decoder layer's output [b, t, d] (before the final norm); `unembed` turns it into
    logits. remat=True recomputes each layer in the backward pass (jax.checkpoint)."""
    if attention_mask_bt is None:
        attention_mask_bt = jnp.ones(input_ids_bt.shape, jnp.int32)
    positions_bt = positions_from_mask(attention_mask_bt)

    def body(x_btd, lp):
        return decoder_layer(lp, config, x_btd, positions_bt, attention_mask_bt), None

    if remat:
        body = jax.checkpoint(body)
    x_btd, _ = jax.lax.scan(body, embed(params, config, input_ids_bt), params["layers"])
    return x_btd


def forward(
    params: Params,
    config: Qwen3Config,
    input_ids_bt: jax.Array,
    attention_mask_bt: jax.Array | None = None,
) -> jax.Array:
    """Logits [b, t, v] float32 for token ids [b, t] (int32).

    attention_mask_bt (1 = real token, 0 = padding; padding on the left) defaults to all ones.
    Positions skip the padding, so a left-padded row gives the same logits at its real tokens
    as the unpadded row. Logits at padding slots are finite but meaningless.
    """
    return unembed(params, config, hidden_states(params, config, input_ids_bt, attention_mask_bt))


# ---------------------------------------------------------------------------------------------
# KV cache: prefill + single-token decode


@flax.struct.dataclass
class KVCache:
    """Keys/values of all layers for a lockstep batch; every field is an array (no recompiles).

    k_lbskh, v_lbskh: [layers, b, cache_len, kv_heads, head_dim] in the compute dtype.
    valid_bs: True where slot s of row b holds a real token (False for left padding and for
      slots not yet written), so it is also the attention mask of the next query.
    next_position_b: RoPE position of the next token of each row (= its real-token count).
    index: the slot the next token is written to (shared by all rows; lockstep decoding).
    """

    k_lbskh: jax.Array
    v_lbskh: jax.Array
    valid_bs: jax.Array
    next_position_b: jax.Array
    index: jax.Array


def kv_cache_logical_axes() -> KVCache:
    """Logical axes per KVCache field, for building its shardings."""
    kv = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
    return KVCache(kv, kv, ("batch", "cache_length"), ("batch",), ())


def kv_cache_shardings(mesh: Mesh, cache: KVCache) -> KVCache:
    """NamedShardings for a KVCache (arrays or abstract): rows over the batch axes, KV heads
    over tensor (when they divide), layers / cache slots / head_dim whole."""
    return tree_shardings(kv_cache_logical_axes(), mesh, cache)


def prefill(
    params: Params,
    config: Qwen3Config,
    input_ids_bt: jax.Array,
    attention_mask_bt: jax.Array,
    cache_len: int,
) -> tuple[jax.Array, KVCache]:
    """Run left-padded prompts [b, t] and return (last-token logits [b, v] f32, cache).

    Prompts must be left-padded (the last column is a real token in every row). The cache has
    `cache_len` (static, >= t) slots; slots [0, t) hold the prompt, the rest are empty.
    """
    b, t = input_ids_bt.shape
    if cache_len < t:
        raise ValueError(f"cache_len={cache_len} is shorter than the prompt length {t}")
    dt = DTYPES[config.compute_dtype]
    positions_bt = positions_from_mask(attention_mask_bt)
    x_btd = embed(params, config, input_ids_bt)

    def body(x_btd, lp):
        def attend(q, k, v):
            return self_attention(config, q, k, v, attention_mask_bt), (k, v)

        return _decoder_layer(lp, config, x_btd, positions_bt, attend)

    x_btd, (k_lbtkh, v_lbtkh) = jax.lax.scan(body, x_btd, params["layers"])
    pad = ((0, 0), (0, 0), (0, cache_len - t), (0, 0), (0, 0))
    kv_axes = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
    valid_bs = jnp.zeros((b, cache_len), bool).at[:, :t].set(attention_mask_bt.astype(bool))
    cache = KVCache(
        k_lbskh=constrain(jnp.pad(k_lbtkh.astype(dt), pad), kv_axes),
        v_lbskh=constrain(jnp.pad(v_lbtkh.astype(dt), pad), kv_axes),
        valid_bs=valid_bs,
        next_position_b=jnp.sum(attention_mask_bt.astype(jnp.int32), axis=-1),
        index=jnp.asarray(t, jnp.int32),
    )
    logits_btv = unembed(params, config, x_btd[:, -1:, :])
    return logits_btv[:, 0, :], cache


def decode_step(
    params: Params, config: Qwen3Config, token_b: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """Append one token per row and return (its next-token logits [b, v] f32, updated cache).

    Cost is one token through the network plus attention over the filled slots [0, index]
    (key blocks of `config.attention_block_size`; the reference "xla" attention, and "auto" on
    CPU when the cache is a single block, read all cache_len slots); nothing is recomputed.
    The caller keeps cache.index < cache_len (a full cache overwrites its last slot).
    Jit with `donate_argnames="cache"` so the cache is updated in place.
    """
    index = cache.index
    positions_b1 = cache.next_position_b[:, None]
    valid_bs = jax.lax.dynamic_update_slice_in_dim(
        cache.valid_bs, jnp.ones((token_b.shape[0], 1), bool), index, axis=1
    )
    decode_impl = attention_lib.resolve(
        config.attention, seq_len=cache.k_lbskh.shape[2], head_dim=config.head_dim,
        dtype=DTYPES[config.compute_dtype], block_size=config.attention_block_size,
    )
    x_b1d = embed(params, config, token_b[:, None])

    # The cache rides in the scan carry (not xs/ys) so each layer writes one slot in place
    # instead of scan re-stacking a full copy of the cache every step.
    def body(carry, xs):
        x_b1d, k_lbskh, v_lbskh = carry
        lp, layer = xs

        def attend(q_b1nh, k_b1kh, v_b1kh):
            k_cache = jax.lax.dynamic_update_slice(
                k_lbskh, k_b1kh[None].astype(k_lbskh.dtype), (layer, 0, index, 0, 0)
            )
            v_cache = jax.lax.dynamic_update_slice(
                v_lbskh, v_b1kh[None].astype(v_lbskh.dtype), (layer, 0, index, 0, 0)
            )
            out_bnh = attention_lib.decode_attention(
                q_b1nh[:, 0], k_cache, v_cache, layer, valid_bs, index + 1,
                impl="xla" if decode_impl == "xla" else "blockwise",
                block_size=config.attention_block_size,
            )
            return out_bnh[:, None], (k_cache, v_cache)

        x_b1d, (k_lbskh, v_lbskh) = _decoder_layer(lp, config, x_b1d, positions_b1, attend)
        return (x_b1d, k_lbskh, v_lbskh), None

    layers = jnp.arange(config.num_layers, dtype=jnp.int32)
    (x_b1d, k_lbskh, v_lbskh), _ = jax.lax.scan(
        body, (x_b1d, cache.k_lbskh, cache.v_lbskh), (params["layers"], layers)
    )
    new_cache = KVCache(
        k_lbskh=k_lbskh,
        v_lbskh=v_lbskh,
        valid_bs=valid_bs,
        next_position_b=cache.next_position_b + 1,
        index=index + 1,
    )
    return unembed(params, config, x_b1d)[:, 0, :], new_cache


# ---------------------------------------------------------------------------------------------
# Bundled model


# One shared jitted forward, so every caller (Qwen3CausalLM, tools, tests) shares its cache.
forward_jit = jax.jit(forward, static_argnames=("config",))


@flax.struct.dataclass
class Qwen3CausalLM:
    """(params, config) as one pytree (config static); calling it runs the jitted `forward`.

    model(input_ids_bt [b, t] int32, attention_mask_bt=None) -> logits_btv [b, t, v] float32.
    """

    params: Params
    config: Qwen3Config = flax.struct.field(pytree_node=False)

    def __call__(self, input_ids_bt, attention_mask_bt=None) -> jax.Array:
        input_ids_bt = jnp.asarray(input_ids_bt, jnp.int32)
        if attention_mask_bt is None:  # an explicit mask keeps one compilation per shape
            attention_mask_bt = jnp.ones(input_ids_bt.shape, jnp.int32)
        return forward_jit(self.params, self.config, input_ids_bt, jnp.asarray(attention_mask_bt, jnp.int32))

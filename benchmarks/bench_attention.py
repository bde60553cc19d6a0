"""Attention: train-step memory vs sequence length, and decode-step time vs filled length.

    JAX_PLATFORMS=cpu python benchmarks/bench_attention.py                 # both parts
    JAX_PLATFORMS=cpu python benchmarks/bench_attention.py --part memory   # or --part decode
    JAX_PLATFORMS=cpu python benchmarks/bench_attention.py --part decode-memory
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python benchmarks/bench_attention.py --part sharded

memory: a small Qwen3 (d 256, 2 layers, 4 query / 2 KV heads, head_dim 64, vocab 2,048, one row,
float32, per-layer remat as the train step's remat_layers) — mean next-token NLL and its gradient
w.r.t. all parameters, compiled (not run) at S = 2k, 4k, 8k with attention "xla" (the
reference) and "blockwise" (block 512); also attention alone (q, k, v -> grad). The measure is
XLA's buffer assignment of the compiled program (`memory_analysis()`: temporaries, arguments,
outputs). From the three lengths, temp(S) = a + b S + c S^2 is solved exactly; c is the S^2
term (bytes per token^2).

decode: a small Qwen3 (d 256, 4 layers, 4 query / 2 KV heads, head_dim 64, vocab 2,048, float32,
batch 8) with a 4,096-slot KV cache. The cache is filled with random keys/values up to the
position (as if decoded so far), then `decode_step` (jitted, cache donated so the slot write is
in place) runs `--steps` consecutive steps from an early (64) and a late (4,000) position, for
"xla" (reads all 4,096 slots every step) and "blockwise" (reads the key blocks below the
filled length; blocks of 512). Early/late and both implementations are interleaved per repeat
in one process (shared-CPU noise hits all four alike).

decode-memory: compiled (not run) `decode_step` of the 0.6B shapes cut to 2 layers and a
1,024-token vocabulary, 8 rows x 9,216 cache slots, cache donated, one device: XLA's
temporaries for xla / blockwise x float32 / bfloat16.

sharded: compiled (not run) gradient of mean(hidden_states^2) of the 0.6B preset cut to 2
layers, float32, 8 rows sharded over fsdp = 8 fake CPU devices (one row per device), per-layer
remat, at S = 2,304 / 4,608 / 9,216 / 18,432 (blockwise) and 9,216 (xla): per-device
temporaries and the number of collectives in the program.

Results -> benchmarks/results/attention.json (machine, command, raw numbers; each part replaces
only its own key).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_blend import machine_info  # noqa: E402  (same folder: benchmarks/)
from trb_jax.models import attention, qwen3

RESULTS = pathlib.Path(__file__).parent / "results"
LENGTHS = (2048, 4096, 8192)
IMPLS = ("xla", "blockwise")


def small_config(layers: int, impl: str) -> qwen3.Qwen3Config:
    return qwen3.Qwen3Config(
        vocab_size=2048, hidden_size=256, num_layers=layers, num_heads=4, num_kv_heads=2,
        head_dim=64, intermediate_size=512, tie_word_embeddings=False, attention=impl,
        attention_block_size=512,
    )


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes)}


def model_grad_memory(impl: str, s: int) -> dict:
    config = small_config(2, impl)
    params = jax.eval_shape(lambda: qwen3.init_params(config, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((1, s), jnp.int32)

    def loss(params, ids_bt):
        mask_bt = jnp.ones_like(ids_bt)
        x = qwen3.hidden_states(params, config, ids_bt, mask_bt, remat=True)
        logits = qwen3.unembed(params, config, x)[:, :-1]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids_bt[:, 1:, None], -1)
        return jnp.mean(nll)

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, ids).compile()
    return {"what": "model loss+grad", "impl": impl, "seq_len": s,
            "compile_s": time.perf_counter() - t0, **_memory(compiled)}


def attention_grad_memory(impl: str, s: int) -> dict:
    q = jax.ShapeDtypeStruct((1, s, 4, 64), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, s, 2, 64), jnp.float32)
    valid = jax.ShapeDtypeStruct((1, s), jnp.bool_)

    def loss(q, k, v, valid):
        out = attention.self_attention(q, k, v, valid, impl=impl, block_size=512)
        return jnp.sum(out * out)

    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, valid).compile()
    return {"what": "attention grad", "impl": impl, "seq_len": s,
            "compile_s": time.perf_counter() - t0, **_memory(compiled)}


def quadratic_fit(rows: list[dict]) -> dict:
    """temp = a + b S + c S^2 through the three lengths (exact solve)."""
    s = np.array([r["seq_len"] for r in rows], np.float64)
    y = np.array([r["temp_bytes"] for r in rows], np.float64)
    a, b, c = np.linalg.solve(np.stack([np.ones_like(s), s, s * s], 1), y)
    return {"a_bytes": a, "b_bytes_per_token": b, "c_bytes_per_token2": c,
            "temp_ratio_8k_over_4k": y[2] / y[1], "temp_ratio_4k_over_2k": y[1] / y[0]}


def run_memory() -> dict:
    rows, fits = [], {}
    for what, fn in (("model loss+grad", model_grad_memory), ("attention grad", attention_grad_memory)):
        for impl in IMPLS:
            part = [fn(impl, s) for s in LENGTHS]
            for r in part:
                print(f"{what:16s} {impl:9s} S={r['seq_len']:5d} temp {r['temp_bytes'] / 2**20:9.1f} MiB "
                      f"(args {r['argument_bytes'] / 2**20:.1f}, out {r['output_bytes'] / 2**20:.1f})", flush=True)
            rows += part
            fits[f"{what} / {impl}"] = quadratic_fit(part)
    return {"rows": rows, "fits": fits}


def _filled_cache(config, batch: int, cache_len: int, position: int, seed: int = 0) -> qwen3.KVCache:
    """A cache as if `position` tokens had been decoded: random keys/values in [0, position)."""
    rng = np.random.default_rng(seed)
    shape = (config.num_layers, batch, cache_len, config.num_kv_heads, config.head_dim)
    k = rng.standard_normal(shape, np.float32)
    v = rng.standard_normal(shape, np.float32)
    k[:, :, position:] = 0.0
    v[:, :, position:] = 0.0
    valid = np.zeros((batch, cache_len), bool)
    valid[:, :position] = True
    return qwen3.KVCache(k_lbskh=jnp.asarray(k), v_lbskh=jnp.asarray(v), valid_bs=jnp.asarray(valid),
                         next_position_b=jnp.full((batch,), position, jnp.int32),
                         index=jnp.asarray(position, jnp.int32))


def run_decode(repeats: int, steps: int, cache_len: int = 4096, batch: int = 8,
               positions=(64, 4000)) -> dict:
    configs = {impl: small_config(4, impl) for impl in IMPLS}
    params = qwen3.init_params(configs["xla"], jax.random.key(0))
    step = jax.jit(qwen3.decode_step, static_argnames="config", donate_argnames="cache")
    tokens = jnp.ones((batch,), jnp.int32)
    caches = {p: _filled_cache(configs["xla"], batch, cache_len, p) for p in positions}
    times = {f"{impl}@{p}": [] for impl in IMPLS for p in positions}
    # Warm-up (compile) and a check that both implementations give the same logits.
    for p in positions:
        out = {}
        for impl in IMPLS:
            cache = jax.tree.map(jnp.copy, caches[p])
            out[impl], _ = step(params, configs[impl], tokens, cache)
        np.testing.assert_allclose(np.asarray(out["blockwise"]), np.asarray(out["xla"]), atol=1e-4)
    for _ in range(repeats):
        for p in positions:
            for impl in IMPLS:
                cache = jax.block_until_ready(jax.tree.map(jnp.copy, caches[p]))
                t0 = time.perf_counter()
                for _ in range(steps):
                    logits, cache = step(params, configs[impl], tokens, cache)
                jax.block_until_ready(logits)
                times[f"{impl}@{p}"].append((time.perf_counter() - t0) / steps * 1e3)
    summary = {k: {"median_ms": float(np.median(v)), "min_ms": float(np.min(v)), "max_ms": float(np.max(v))}
               for k, v in times.items()}
    for k, v in summary.items():
        print(f"decode {k:16s} median {v['median_ms']:.2f} ms/step (min {v['min_ms']:.2f}, max {v['max_ms']:.2f})")
    return {"cache_len": cache_len, "batch": batch, "positions": list(positions), "steps_per_repeat": steps,
            "block_size": 512, "ms_per_step_raw": times, "summary": summary}


def decode_memory() -> list[dict]:
    rows = []
    for impl in IMPLS:
        for dt in ("float32", "bfloat16"):
            cfg = dataclasses.replace(qwen3.qwen3_0p6b, num_layers=2, vocab_size=1024,
                                      attention=impl).with_dtype(dt)
            params = jax.eval_shape(lambda: qwen3.init_params(cfg, jax.random.key(0)))
            b, s = 8, 9216
            kv = jax.ShapeDtypeStruct((2, b, s, 8, 128), jnp.dtype(dt))
            cache = qwen3.KVCache(kv, kv, jax.ShapeDtypeStruct((b, s), jnp.bool_),
                                  jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
            tok = jax.ShapeDtypeStruct((b,), jnp.int32)
            step = jax.jit(qwen3.decode_step, static_argnames="config", donate_argnames="cache")
            row = {"impl": impl, "dtype": dt, "cache_bytes": 2 * kv.size * kv.dtype.itemsize,
                   **_memory(step.lower(params, cfg, tok, cache).compile())}
            print(f"decode-memory {impl:9s} {dt:8s} temp {row['temp_bytes'] / 2**30:.3f} GiB", flush=True)
            rows.append(row)
    return rows


def sharded_memory() -> list[dict]:
    from jax.sharding import NamedSharding, PartitionSpec as P

    from trb_jax import sharding

    if jax.device_count() != 8:
        raise SystemExit("--part sharded needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    rows = []
    for impl, s in [("xla", 9216)] + [("blockwise", s) for s in (2304, 4608, 9216, 18432)]:
        cfg = dataclasses.replace(qwen3.qwen3_0p6b, num_layers=2, attention=impl)
        abstract = jax.eval_shape(lambda: qwen3.init_params(cfg, jax.random.key(0)))
        params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                              abstract, qwen3.param_shardings(cfg, mesh))
        ids = jax.ShapeDtypeStruct((8, s), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))

        def loss(params, ids):
            x = qwen3.hidden_states(params, cfg, ids, jnp.ones_like(ids), remat=True)
            return jnp.mean(x.astype(jnp.float32) ** 2)

        with jax.set_mesh(mesh):
            compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
        hlo = compiled.as_text()
        row = {"impl": impl, "seq_len": s, **_memory(compiled),
               "collectives": {op: hlo.count(f"{op}(") for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all")}}
        print(f"sharded {impl:9s} S={s:6d} temp {row['temp_bytes'] / 2**30:.2f} GiB {row['collectives']}", flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "memory", "decode", "decode-memory", "sharded"), default="all")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(RESULTS / "attention.json"))
    args = parser.parse_args(argv)
    out_path = pathlib.Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    result.setdefault("commands", {})[args.part] = " ".join(["python"] + sys.argv)
    result["machine"] = machine_info()
    if args.part in ("all", "memory"):
        result["memory"] = run_memory()
    if args.part in ("all", "decode"):
        result["decode"] = run_decode(args.repeats, args.steps)
    if args.part in ("all", "decode-memory"):
        result["decode_memory"] = decode_memory()
    if args.part == "sharded":  # needs 8 (fake) devices: run it on its own
        result["sharded"] = sharded_memory()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

"""Prefill throughput on CPU: trb_jax Qwen3 (jitted) vs transformers Qwen3 (torch.inference_mode).

    JAX_PLATFORMS=cpu python benchmarks/bench_forward.py [--repeats 7] [--attention xla,blockwise]
        [--cases qwen3_0p6b,small] [--out benchmarks/results/forward.json]

Both frameworks run the *same* random float32 weights (ours, converted with the checkpoint
mapping) on the same random token ids; a full forward (all logits) per call. Shapes:
  qwen3_0p6b  the published Qwen3-0.6B shape (28 layers, d 1024, vocab 151936), batch 1 x 128
  small       d 256, 4 layers, 4/2 heads of 64, MLP 768, vocab 151936, batch 1 x 128 and 4 x 128
The calls are interleaved in one process (each repeat runs every JAX attention implementation,
then PyTorch), so a change in machine load hits both sides. Per call it records the wall time
and the process CPU time (all threads; on a loaded machine wall time measures the scheduler as
much as the code). Writes machine info, load averages, the thread settings (torch threads,
OMP_WAIT_POLICY, XLA_FLAGS), the command and raw per-repeat timings to --out and prints a
markdown table. JAX compile time is reported separately and excluded from throughput.

On a machine with more runnable threads than cores, PyTorch's OpenMP pool (active spin-wait by
default) slows down several-fold; `OMP_WAIT_POLICY=PASSIVE` in the environment (read when torch
loads) removes that; the JSON says which setting ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from trb_jax.models import checkpoint, qwen3

SMALL = qwen3.Qwen3Config(
    vocab_size=151936, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
    intermediate_size=768, tie_word_embeddings=True,
)  # fmt: skip
CASES = [("qwen3_0p6b", qwen3.qwen3_0p6b, 1, 128), ("small", SMALL, 1, 128), ("small", SMALL, 4, 128)]
ATTENTION = ("xla", "blockwise")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def torch_model(params, config: qwen3.Qwen3Config) -> torch.nn.Module:
    hf_config = transformers.Qwen3Config(**checkpoint.config_to_hf(config))
    with torch.device("meta"):
        model = transformers.Qwen3ForCausalLM(hf_config)
    state = {k: torch.from_numpy(np.array(v)) for k, v in checkpoint.params_to_hf(params, config).items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_config)  # inv_freq buffer off meta
    return model.eval()


def time_calls(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds over all threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def median_spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def bench_case(name, config, batch, length, repeats, attention=ATTENTION) -> dict:
    params = jax.jit(qwen3.init_params, static_argnums=0)(config, jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(batch, length)).astype(np.int32)
    ids_j, mask_j = jnp.asarray(ids), jnp.ones((batch, length), jnp.int32)
    forward = jax.jit(qwen3.forward, static_argnames="config")

    calls, compile_s, jax_out = {}, {}, {}
    for impl in attention:
        cfg = dataclasses.replace(config, attention=impl)
        start = time.perf_counter()
        compiled = forward.lower(params, cfg, ids_j, mask_j).compile()
        compile_s[impl] = time.perf_counter() - start
        calls[f"jax_{impl}"] = lambda c=compiled: c(params, ids_j, mask_j).block_until_ready()
        jax_out[impl] = np.asarray(calls[f"jax_{impl}"]())  # warm-up

    model = torch_model(params, config)
    ids_t = torch.tensor(ids, dtype=torch.long)
    calls["torch"] = lambda: model(ids_t).logits
    load = {"before": os.getloadavg()}
    wall = {k: [] for k in calls}
    cpu = {k: [] for k in calls}
    with torch.inference_mode():
        torch_out = calls["torch"]().numpy()  # warm-up
        for _ in range(repeats):
            for key, fn in calls.items():
                w, c = timed(fn)
                wall[key].append(w)
                cpu[key].append(c)
    load["after"] = os.getloadavg()
    del model, params

    tokens = batch * length
    jax_results = {}
    for impl in attention:
        key = f"jax_{impl}"
        ratios = [t / j for j, t in zip(wall[key], wall["torch"])]  # per repeat: torch / jax time
        jax_results[impl] = {
            "compile_s": compile_s[impl],
            "times_s": wall[key],
            "cpu_s": cpu[key],
            "tokens_per_s": tokens / statistics.median(wall[key]),
            "best_tokens_per_s": tokens / min(wall[key]),
            "speedup_vs_torch": statistics.median(wall["torch"]) / statistics.median(wall[key]),
            "speedup_per_repeat": median_spread(ratios),
            "cpu_ratio_vs_torch": statistics.median(cpu["torch"]) / statistics.median(cpu[key]),
            "max_abs_logit_diff": float(np.abs(jax_out[impl] - torch_out).max()),
        }
    return {
        "shape": name,
        "config": {k: v for k, v in vars(config).items()},
        "num_params": qwen3.num_params(config),
        "batch": batch,
        "length": length,
        "dtype": "float32",
        "load_average_1_5_15": load,
        "jax": jax_results,
        "torch_times_s": wall["torch"],
        "torch_cpu_s": cpu["torch"],
        "torch_tokens_per_s": tokens / statistics.median(wall["torch"]),
        "torch_best_tokens_per_s": tokens / min(wall["torch"]),
        "max_abs_logit": float(np.abs(torch_out).max()),
    }


def profile_parts(config, length, repeats) -> dict:
    """Wall and CPU time of the forward's parts at batch 1 x `length`, JAX vs PyTorch,
    interleaved: embedding, one decoder layer, its attention sublayer (projections, norms,
    RoPE, attention, output projection), its MLP, one RMSNorm, the final norm + LM head, and
    the whole layer stack (JAX: the `lax.scan` over stacked weights)."""
    cfg = dataclasses.replace(config, attention="xla")
    params = jax.jit(qwen3.init_params, static_argnums=0)(cfg, jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, length)).astype(np.int32)
    ids_j, mask_j = jnp.asarray(ids), jnp.ones((1, length), jnp.int32)
    positions_j = qwen3.positions_from_mask(mask_j)
    layer0 = jax.tree.map(jnp.array, qwen3.layer_params(params, 0))  # its own buffers
    x_j = jax.random.normal(jax.random.key(1), (1, length, cfg.hidden_size), jnp.float32)
    model = torch_model(params, cfg)
    ids_t, x_t = torch.tensor(ids, dtype=torch.long), torch.from_numpy(np.array(x_j))
    position_ids = torch.arange(length)[None]
    rope = model.model.rotary_emb(x_t, position_ids)
    layer_t = model.model.layers[0]

    def jax_call(fn, *args):
        compiled = jax.jit(fn).lower(*args).compile()
        return lambda: jax.block_until_ready(compiled(*args))

    parts = {
        "embed": (jax_call(lambda p, i: qwen3.embed(p, cfg, i), params, ids_j),
                  lambda: model.model.embed_tokens(ids_t)),
        "decoder_layer": (
            jax_call(lambda lp, x: qwen3.decoder_layer(lp, cfg, x, positions_j, mask_j), layer0, x_j),
            lambda: layer_t(x_t, attention_mask=None, position_embeddings=rope, position_ids=position_ids)),
        "attention_sublayer": (
            jax_call(lambda lp, x: qwen3.attention(lp, cfg, x, positions_j, mask_j), layer0, x_j),
            lambda: layer_t.self_attn(x_t, position_embeddings=rope, attention_mask=None)),
        "mlp": (jax_call(qwen3.mlp, layer0, x_j), lambda: layer_t.mlp(x_t)),
        "rms_norm": (jax_call(lambda lp, x: qwen3.rms_norm(x, lp["attn_norm_d"], cfg.rms_norm_eps), layer0, x_j),
                     lambda: layer_t.input_layernorm(x_t)),
        "final_norm_lm_head": (jax_call(lambda p, x: qwen3.unembed(p, cfg, x), params, x_j),
                               lambda: model.lm_head(model.model.norm(x_t)).float()),
        "layer_stack": (jax_call(lambda p, i, m: qwen3.hidden_states(p, cfg, i, m), params, ids_j, mask_j),
                        lambda: model.model(ids_t).last_hidden_state),
    }  # fmt: skip
    wall = {(k, side): [] for k in parts for side in ("jax", "torch")}
    cpu = {key: [] for key in wall}
    load = {"before": os.getloadavg()}
    with torch.inference_mode():
        for jax_fn, torch_fn in parts.values():  # warm-up
            jax_fn(), torch_fn()
        for _ in range(repeats):
            for name, fns in parts.items():
                for side, fn in zip(("jax", "torch"), fns):
                    w, c = timed(fn)
                    wall[name, side].append(w)
                    cpu[name, side].append(c)
    load["after"] = os.getloadavg()
    return {
        "batch": 1, "length": length, "attention": "xla", "load_average_1_5_15": load,
        "parts": {name: {side: {"times_s": wall[name, side], "cpu_s": cpu[name, side]}
                         for side in ("jax", "torch")} for name in parts},
    }  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--attention", default=",".join(ATTENTION),
                        help="comma-separated Qwen3Config.attention values to time")
    parser.add_argument("--cases", default="qwen3_0p6b,small", help="comma-separated shape names")
    parser.add_argument("--profile", action="store_true",
                        help="also time the 0.6B forward's parts (JAX vs PyTorch), see profile_parts")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "forward.json"))
    args = parser.parse_args(argv)
    attention = tuple(args.attention.split(","))
    names = set(args.cases.split(","))

    results = []
    for name, config, batch, length in CASES:
        if name not in names:
            continue
        print(f"running {name} {batch}x{length} ...", file=sys.stderr, flush=True)
        results.append(bench_case(name, config, batch, length, args.repeats, attention))

    profile = None
    if args.profile:
        print("profiling qwen3_0p6b parts ...", file=sys.stderr, flush=True)
        profile = profile_parts(qwen3.qwen3_0p6b, 128, args.repeats)

    report = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "transformers": transformers.__version__,
        },
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "XLA_FLAGS")},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "repeats": args.repeats,
        "results": results,
        "profile_qwen3_0p6b": profile,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    print(f"CPU: {report['machine']['cpu']} ({report['machine']['cores']} cores); "
          f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={report['env']['OMP_WAIT_POLICY']}); float32; {args.repeats} repeats, "
          f"interleaved; tok/s from the median (best) wall time")  # fmt: skip
    print("| shape | batch x tokens | attention | JAX tok/s | PyTorch tok/s | JAX / PyTorch: medians (per-repeat min-max) | CPU s per call JAX / PyTorch | load (1 min) | JAX compile s | max abs logit diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for impl, j in r["jax"].items():
            spread = j["speedup_per_repeat"]
            print(
                f"| {r['shape']} | {r['batch']} x {r['length']} | {impl} | "
                f"{j['tokens_per_s']:.0f} ({j['best_tokens_per_s']:.0f}) | "
                f"{r['torch_tokens_per_s']:.0f} ({r['torch_best_tokens_per_s']:.0f}) | "
                f"{j['speedup_vs_torch']:.2f} ({spread['min']:.2f}-{spread['max']:.2f}) | "
                f"{statistics.median(j['cpu_s']):.2f} / {statistics.median(r['torch_cpu_s']):.2f} | "
                f"{r['load_average_1_5_15']['before'][0]:.1f}-{r['load_average_1_5_15']['after'][0]:.1f} | "
                f"{j['compile_s']:.1f} | {j['max_abs_logit_diff']:.1e} |"
            )
    if profile:
        print("\n| part (0.6B shape, 1 x 128) | JAX ms: median (min-max) | PyTorch ms | JAX / PyTorch CPU s (medians) |")
        print("|---|---|---|---|")
        for name, sides in profile["parts"].items():
            j, t = sides["jax"], sides["torch"]
            cells = [f"{1e3 * statistics.median(x['times_s']):.1f} ({1e3 * min(x['times_s']):.1f}-"
                     f"{1e3 * max(x['times_s']):.1f})" for x in (j, t)]
            print(f"| {name} | {cells[0]} | {cells[1]} | "
                  f"{statistics.median(j['cpu_s']):.3f} / {statistics.median(t['cpu_s']):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

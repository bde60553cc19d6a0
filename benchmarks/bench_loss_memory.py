"""Peak memory of the LM head + top-k reverse KL loss and its gradient: custom VJP vs naive (and an older remat path).

    JAX_PLATFORMS=cpu python benchmarks/bench_loss_memory.py                      # memory table
    JAX_PLATFORMS=cpu python benchmarks/bench_loss_memory.py --impls vjp --merge  # some rows only
    JAX_PLATFORMS=cpu python benchmarks/bench_loss_memory.py --mode-timing         # stored vs teacher step

Memory: inputs are hidden states x [1, T, D] and an unembedding W [D, V] (no final norm), with
the rollout-style stored top-k ids and teacher log-probs [1, T, k]; the loss is the masked mean
top-k reverse KL, differentiated w.r.t. x and W. Implementations:
  vjp    trb_jax.train_step.chunked_token_loss (what the train step runs): a no-gradient
         lax.map over T-chunks, then a custom VJP looping over (T-chunk, V-slice) logits tiles
         with dW written slice by slice into one loop-carried buffer;
  remat  (rows in older results only) the train step's loss before the custom VJP, a lax.map
         over T-chunks under jax.checkpoint; that code path has been removed, its rows stay in
         the results file for comparison;
  naive  materialises the [T, V] float32 logits.
Each (impl, T) runs in a fresh subprocess, which reports XLA's own buffer accounting of the
compiled program (arguments + outputs + temporaries) and, after one jitted value_and_grad call,
the process's resident memory: just before the call (VmRSS: the runtime, the inputs) and its
peak during the call (VmHWM, reset to VmRSS through /proc/self/clear_refs before the call).
Results -> benchmarks/results/loss_memory.json (--merge: replace only the rows run now).

--mode-timing: one train step in the stored mode (the rollout's teacher top-k log-probs, no
teacher forward) vs the teacher mode (batched teacher forward) on a small config with the full
Qwen3 vocabulary -> benchmarks/results/train_step_modes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).parent / "results"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_rss_mb() -> tuple[float, float]:
    hwm = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """VmHWM := current RSS (Linux >= 4.0), so the next peak is of what runs after this call,
    with everything allocated so far still resident. ru_maxrss cannot be reset."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(impl: str, t: int, d: int, v: int, k: int, chunk: int, vocab_chunk: int, run: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from trb_jax import losses, train_step

    import numpy as np

    # Inputs from NumPy, row block by row block: jax.random would peak at several [D, V] temps.
    rng = np.random.default_rng(0)
    w_np = np.empty((d, v), np.float32)
    for i in range(0, d, 64):
        w_np[i : i + 64] = 0.02 * rng.standard_normal((min(64, d - i), v), np.float32)
    w_dv = jnp.asarray(w_np)
    del w_np
    x_btd = jnp.asarray(rng.standard_normal((1, t, d), np.float32))
    ids_btk = jnp.asarray(rng.integers(0, v, size=(1, t, k)).astype(np.int32))
    lp_btk = jax.nn.log_softmax(jnp.asarray(rng.standard_normal((1, t, k), np.float32)), axis=-1)
    mask_bt = jnp.ones((1, t), bool)
    jax.block_until_ready((x_btd, w_dv, ids_btk, lp_btk))
    inputs_rss = _peak_rss_mb()[0]
    _reset_peak()

    def vjp(x_btd, w_dv):
        per_bt, _, _ = train_step.chunked_token_loss(
            train_step.LinearHead(w_dv), x_btd, jnp.zeros((1, t), jnp.int32),
            chunk_size=chunk, vocab_chunk_size=vocab_chunk, top_k=k,
            stored={"topk_ids_btk": ids_btk, "topk_teacher_logprob_btk": lp_btk},
        )  # fmt: skip
        return losses.masked_mean(per_bt, mask_bt)

    def naive(x_btd, w_dv):
        logp_btv = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", x_btd, w_dv), axis=-1)
        log_s = jnp.take_along_axis(logp_btv, ids_btk, axis=-1)
        return losses.masked_mean(losses.topk_reverse_kl_from_log_probs(log_s, lp_btk), mask_bt)

    fn = jax.jit(jax.value_and_grad({"vjp": vjp, "naive": naive}[impl], argnums=(0, 1)))
    compiled = fn.lower(x_btd, w_dv).compile()
    out_compiled_rss = _peak_rss_mb()[0]
    _reset_peak()
    ma = compiled.memory_analysis()
    out = {
        "impl": impl, "T": t, "D": d, "V": v, "k": k, "chunk": None if impl == "naive" else chunk,
        "vocab_chunk": vocab_chunk if impl == "vjp" else None,
        "peak_rss_inputs_mb": round(inputs_rss, 1),
        "peak_rss_compile_mb": round(out_compiled_rss, 1),
        "xla_argument_mb": round(ma.argument_size_in_bytes / 2**20, 1),
        "xla_output_mb": round(ma.output_size_in_bytes / 2**20, 1),
        "xla_temp_mb": round(ma.temp_size_in_bytes / 2**20, 1),
    }  # fmt: skip
    out["xla_total_mb"] = round(out["xla_argument_mb"] + out["xla_output_mb"] + out["xla_temp_mb"], 1)
    if run:
        _reset_peak()
        out["rss_before_call_mb"] = round(_rss_mb(), 1)
        start = time.perf_counter()
        jax.block_until_ready(compiled(x_btd, w_dv))
        out["seconds"] = round(time.perf_counter() - start, 2)
        out["peak_rss_mb"], out["ru_maxrss_mb"] = (round(x, 1) for x in _peak_rss_mb())
        out["call_rss_increase_mb"] = round(out["peak_rss_mb"] - out["rss_before_call_mb"], 1)
    return out


def mode_timing(repeats: int) -> dict:
    import jax
    import numpy as np

    from trb_jax import train_step as ts
    from trb_jax.models import qwen3

    v = 151_936
    student = qwen3.Qwen3Config(vocab_size=v, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                head_dim=32, intermediate_size=384, tie_word_embeddings=True)  # fmt: skip
    teacher = qwen3.Qwen3Config(vocab_size=v, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                                head_dim=64, intermediate_size=768, tie_word_embeddings=True)  # fmt: skip
    b, p, t, k = 4, 32, 128, 16
    cfg = ts.TrainConfig(student=student, teacher=teacher, top_k=k, chunk_size=64)
    params_s = qwen3.init_params(student, jax.random.key(1))
    params_t = qwen3.init_params(teacher, jax.random.key(2))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, v, size=(b, p + t)).astype(np.int32)
    teacher_batch = ts.Batch(
        input_ids_bs=ids, attention_mask_bs=np.ones_like(ids), response_mask_bt=np.ones((b, t), bool),
        teacher_input_ids_bs=ids, teacher_attention_mask_bs=np.ones_like(ids),
    )  # fmt: skip
    stored_batch = ts.Batch(
        input_ids_bs=ids, attention_mask_bs=np.ones_like(ids), response_mask_bt=np.ones((b, t), bool),
        topk_ids_btk=rng.integers(0, v, size=(b, t, k)).astype(np.int32),
        topk_teacher_logprob_btk=np.log(np.full((b, t, k), 1.0 / k, np.float32)),
    )  # fmt: skip
    step = ts.jit_train_step(cfg)
    state = ts.init_train_state(params_s, cfg, jax.random.key(0))
    times = {"stored": [], "teacher": []}
    for mode, batch, tp in (("stored", stored_batch, None), ("teacher", teacher_batch, params_t)):
        state, m = step(state, batch, tp)  # compile
        jax.block_until_ready(m)
        for _ in range(repeats):
            start = time.perf_counter()
            state, m = step(state, batch, tp)
            jax.block_until_ready(m)
            times[mode].append(round(time.perf_counter() - start, 3))
    return {
        "student": "d128 L2 V151936 tied", "teacher": "d256 L4 V151936 tied",
        "batch": b, "prompt": p, "response": t, "top_k": k, "chunk": 64, "seconds": times,
        "best_stored_s": min(times["stored"]), "best_teacher_s": min(times["teacher"]),
    }  # fmt: skip


def machine() -> dict:
    import jax

    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ts", default="1024,4096,8192")
    ap.add_argument("--naive-max-t", type=int, default=4096, help="naive runs only up to this T")
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--v", type=int, default=151_936)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--vocab-chunk", type=int, default=8192)
    ap.add_argument("--impls", default="vjp,naive")
    ap.add_argument("--merge", action="store_true", help="keep the other rows of the existing JSON")
    ap.add_argument("--no-run", action="store_true", help="XLA buffer accounting only, no execution")
    ap.add_argument("--mode-timing", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, t = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(impl, t, args.d, args.v, args.k, args.chunk, args.vocab_chunk, not args.no_run)))
        return
    RESULTS.mkdir(exist_ok=True)
    command = "JAX_PLATFORMS=cpu python " + " ".join(sys.argv)
    if args.mode_timing:
        result = {"machine": machine(), "command": command, **mode_timing(args.repeats)}
        (RESULTS / "train_step_modes.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    rows = []
    for t in (int(x) for x in args.ts.split(",")):
        for impl in args.impls.split(","):
            run = not args.no_run and (impl != "naive" or t <= args.naive_max_t)
            cmd = [sys.executable, __file__, "--worker", impl, str(t), "--d", str(args.d), "--v", str(args.v),
                   "--k", str(args.k), "--chunk", str(args.chunk), "--vocab-chunk", str(args.vocab_chunk)]
            cmd += [] if run else ["--no-run"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"impl": impl, "T": t, "error": proc.stderr[-2000:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    path = RESULTS / "loss_memory.json"
    if args.merge and path.exists():
        new = {(r["impl"], r["T"]) for r in rows}
        old = [{**r, "impl": "remat" if r["impl"] == "chunked" else r["impl"]}  # the old name
               for r in json.loads(path.read_text())["results"]]
        old = [r for r in old if (r["impl"], r["T"]) not in new]
        rows = sorted(old + rows, key=lambda r: (r["T"], ["vjp", "remat", "naive"].index(r["impl"])))
    result = {"machine": machine(), "command": command, "results": rows}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| impl | T | XLA args+out+temp MiB | RSS before call MiB | peak RSS in call MiB | increase MiB | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['T']} | error | | | | |")
            continue
        xla = r["xla_argument_mb"] + r["xla_output_mb"] + r["xla_temp_mb"]
        print(f"| {r['impl']} | {r['T']} | {xla:.1f} | {r.get('rss_before_call_mb', '')} | "
              f"{r.get('peak_rss_mb', 'not run')} | {r.get('call_rss_increase_mb', '')} | {r.get('seconds', '')} |")  # fmt: skip


if __name__ == "__main__":
    main()

"""Prefill throughput on CPU: trb_jax Qwen3 (jitted) vs transformers Qwen3 (torch.inference_mode).

    JAX_PLATFORMS=cpu python benchmarks/bench_forward.py [--repeats 7] [--out benchmarks/results/forward.json]

Both frameworks run the *same* random float32 weights (ours, converted with the checkpoint
mapping) on the same random token ids; a full forward (all logits) per call. Shapes:
  qwen3_0p6b  the published Qwen3-0.6B shape (28 layers, d 1024, vocab 151936), batch 1 x 128
  small       d 256, 4 layers, 4/2 heads of 64, MLP 768, vocab 151936, batch 1 x 128 and 4 x 128
Writes machine info, versions, the command and raw per-repeat timings to --out and prints a
markdown table. JAX compile time is reported separately and excluded from throughput.
"""

from __future__ import annotations

import argparse
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


def bench_case(name, config, batch, length, repeats) -> dict:
    params = jax.jit(qwen3.init_params, static_argnums=0)(config, jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(batch, length)).astype(np.int32)
    ids_j, mask_j = jnp.asarray(ids), jnp.ones((batch, length), jnp.int32)
    forward = jax.jit(qwen3.forward, static_argnames="config")

    start = time.perf_counter()
    compiled = forward.lower(params, config, ids_j, mask_j).compile()
    compile_s = time.perf_counter() - start
    jax_out = compiled(params, ids_j, mask_j).block_until_ready()  # warm-up
    jax_times = time_calls(lambda: compiled(params, ids_j, mask_j).block_until_ready(), repeats)

    model = torch_model(params, config)
    ids_t = torch.tensor(ids, dtype=torch.long)
    with torch.inference_mode():
        torch_out = model(ids_t).logits  # warm-up
        torch_times = time_calls(lambda: model(ids_t).logits, repeats)
    max_diff = float(np.abs(np.asarray(jax_out) - torch_out.numpy()).max())
    del model, params

    tokens = batch * length
    return {
        "shape": name,
        "config": {k: v for k, v in vars(config).items()},
        "num_params": qwen3.num_params(config),
        "batch": batch,
        "length": length,
        "dtype": "float32",
        "jax_compile_s": compile_s,
        "jax_times_s": jax_times,
        "torch_times_s": torch_times,
        "jax_tokens_per_s": tokens / statistics.median(jax_times),
        "torch_tokens_per_s": tokens / statistics.median(torch_times),
        "jax_best_tokens_per_s": tokens / min(jax_times),
        "torch_best_tokens_per_s": tokens / min(torch_times),
        "max_abs_logit_diff": max_diff,
        "max_abs_logit": float(torch_out.abs().max()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "forward.json"))
    args = parser.parse_args(argv)

    results = []
    for name, config, batch, length in CASES:
        print(f"running {name} {batch}x{length} ...", file=sys.stderr, flush=True)
        results.append(bench_case(name, config, batch, length, args.repeats))

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
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "repeats": args.repeats,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    print(f"CPU: {report['machine']['cpu']} ({report['machine']['cores']} cores); "
          f"jax {jax.__version__}, torch {torch.__version__}; float32; tok/s from the median (best) of {args.repeats} repeats")  # fmt: skip
    print("| shape | params | batch x tokens | JAX tok/s | PyTorch tok/s | JAX / PyTorch (median) | JAX compile s | max abs logit diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['shape']} | {r['num_params'] / 1e6:.0f}M | {r['batch']} x {r['length']} | "
            f"{r['jax_tokens_per_s']:.0f} ({r['jax_best_tokens_per_s']:.0f}) | "
            f"{r['torch_tokens_per_s']:.0f} ({r['torch_best_tokens_per_s']:.0f}) | "
            f"{r['jax_tokens_per_s'] / r['torch_tokens_per_s']:.2f} | {r['jax_compile_s']:.1f} | "
            f"{r['max_abs_logit_diff']:.1e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

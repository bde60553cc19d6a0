"""Compare trb_jax's Qwen3 with transformers' PyTorch Qwen3 on one checkpoint.

    python -m trb_jax.tools.compare_torch --checkpoint DIR_OR_HUB_ID [--dtype bfloat16] \
        [--prompts "Hello" "2+2="] [--tolerance 1e-2]

Both frameworks load the same safetensors and run the same token ids (the checkpoint's tokenizer
on --prompts when it has one, else random ids from a fixed seed; several prompts are
left-padded into one batch). Prints max/mean absolute logit difference, the max per-token
KL(torch || jax) and top-1 agreement over real tokens, and exits 1 when the max KL exceeds
--tolerance (default 1e-5 for float32, 1e-2 for bfloat16), else 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from trb_jax.models import checkpoint

DEFAULT_TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
DEFAULT_PROMPTS = ["The capital of France is", "def fibonacci(n):", "1 + 1 ="]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trb_jax.tools.compare_torch", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or Hugging Face Hub id")
    parser.add_argument("--dtype", choices=sorted(DEFAULT_TOLERANCE), default="float32")
    parser.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS, help="used when the checkpoint has a tokenizer")
    parser.add_argument("--num-random", type=int, default=3, help="random-id prompts when there is no tokenizer")
    parser.add_argument("--length", type=int, default=16, help="length of random-id prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=None, help="max allowed per-token KL(torch || jax)")
    return parser.parse_args(argv)


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()


def make_batch(directory: Path, args: argparse.Namespace, vocab_size: int):
    """(input_ids_bt int32, attention_mask_bt int32, source description); left-padded."""
    if _has_tokenizer(directory):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in args.prompts]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        source = f"tokenizer, {len(rows)} prompts"
    else:
        rng = np.random.default_rng(args.seed)
        rows = [list(rng.integers(0, vocab_size, size=args.length)) for _ in range(args.num_random)]
        pad = 0
        source = f"random ids (seed {args.seed}), {len(rows)} x {args.length}"
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), pad, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, row in enumerate(rows):
        ids[i, t - len(row) :] = row
        mask[i, t - len(row) :] = 1
    return ids, mask, source


def torch_logits(directory: Path, dtype: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=False
    ).eval()
    mask_t = torch.tensor(mask, dtype=torch.long)
    with torch.inference_mode():
        out = model(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=mask_t,
            position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0),  # the positions JAX uses
        )
    return out.logits.float().numpy()


def compare(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Logit-difference metrics over the real (mask == 1) tokens, computed in float64."""
    real = mask.astype(bool)
    p = reference[real].astype(np.float64)
    q = candidate[real].astype(np.float64)
    log_p = p - np.logaddexp.reduce(p, axis=-1, keepdims=True)
    log_q = q - np.logaddexp.reduce(q, axis=-1, keepdims=True)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    diff = np.abs(p - q)
    return {
        "tokens": int(real.sum()),
        "max_abs_logit": float(np.abs(p).max()),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_kl": float(kl.max()),
        "top1_agreement": float(np.mean(p.argmax(-1) == q.argmax(-1))),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tolerance = DEFAULT_TOLERANCE[args.dtype] if args.tolerance is None else args.tolerance
    directory = checkpoint.resolve_checkpoint_dir(args.checkpoint)
    model = checkpoint.from_pretrained(directory, dtype=args.dtype)
    ids, mask, source = make_batch(directory, args, model.config.vocab_size)
    jax_logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    metrics = compare(torch_logits(directory, args.dtype, ids, mask), jax_logits, mask)
    ok = metrics["max_kl"] <= tolerance
    print(f"checkpoint: {directory}")
    print(f"dtype: {args.dtype}; inputs: {source}; real tokens: {metrics['tokens']}")
    print("| metric | value |")
    print("|---|---|")
    for key in ("max_abs_logit", "max_abs_diff", "mean_abs_diff", "max_kl", "top1_agreement"):
        print(f"| {key} | {metrics[key]:.3e} |")
    print(f"{'PASS' if ok else 'FAIL'}: max per-token KL {metrics['max_kl']:.3e} {'<=' if ok else '>'} tolerance {tolerance:.1e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

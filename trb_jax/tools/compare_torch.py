"""JAX (trb_jax) vs PyTorch (transformers + trb_jax/tools/torch_opd.py) on the same checkpoints.

    python -m trb_jax.tools.compare_torch --mode logits --checkpoint DIR_OR_HUB_ID
    python -m trb_jax.tools.compare_torch --mode train-step --student DIR --teacher DIR [--out r.json]
    python -m trb_jax.tools.compare_torch --mode blend --toy --eps 0.1

Modes:
  logits      same ids through both frameworks' Qwen3: logit differences, per-token KL(torch || jax),
              top-1 agreement (one checkpoint, or each of --student / --teacher).
  train-step  same student, teacher and batch: one OPD update by the project's train step
              (trb_jax.train_step: chunked top-k reverse KL, clip + AdamW) and by torch_opd
              (autograd, clip_grad_norm_, torch.optim.AdamW): per-token loss, per-tensor gradient
              and update differences (max abs and rel), plus torch's AdamW fed JAX's gradients.
  blend       teacher-forced along the response: the TRB behavior per position, JAX's
              `trust_region_blend` vs a float64 bisection in torch: beta*, KL(mu* || pi_S), log mu*.

Inputs: prompts (--prompts; defaults that any tokenizer can encode, else random ids from --seed)
left-padded into one batch; the response is the torch student's greedy continuation of
--response-length tokens (EOS-merged; columns after a stop are masked). Both models see the same
[prompt | response] ids (they must share the vocabulary). Prints tables, writes everything to
--out (JSON) and exits 1 when a check is past its tolerance (stated in the output and in
docs/models.md), 2 on a usage or checkpoint error, else 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from trb_jax.errors import cli_main, one_line
from trb_jax.models import checkpoint

MODES = ("logits", "train-step", "blend")
# Default per-token KL(torch || jax) tolerance of the logits mode (also log mu* in blend mode).
DEFAULT_TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
# Tolerances of the train-step and blend modes; why each value: docs/models.md ("Tolerances").
TOLERANCES: dict[str, dict[str, float | None]] = {
    "float32": {
        "loss_fn_rel": 1e-5,  # per-token loss vs torch's on JAX's logits, / max(1, |loss|)
        "loss_rel": 1e-5,  # per-token loss end to end: x max(1, |loss|) (nats), plus loss_sensitivity
        "loss_mean_rel": 1e-5,  # the step's loss, same scale
        "grad_rel": 1e-4,  # per tensor: max |g_jax - g_torch| / max |g_torch|
        "grad_rel_fro": 1e-4,  # per tensor: ||g_jax - g_torch|| / ||g_torch||
        "grad_vs_f32": None,  # bf16 only
        "update_far_lr": 1e-2,  # |g| >= 1e3 adam eps: update diff / lr (1e-5 at the default lr 1e-3)
        "update_lr": 1e-2,  # every element, beyond the part the gradient difference explains, / lr
        "update_ulp": 2.0**-22,  # plus this x |p|: float32 rounds p_new at 2^-24 |p| per op (x4 margin)
        "same_grad_lr": 1e-4,  # torch AdamW on JAX's gradients, / lr, beyond the ulp allowance
        "beta_solver": 1.0,  # x the allowance of blend_tolerance
        "kl_blend": 1e-5,  # per-position KL(mu*_torch || mu*_jax)
    },
    "bfloat16": {
        "loss_fn_rel": 1e-5,  # the loss runs in float32 on float32 logits either way
        "loss_rel": 1e-2,
        "loss_mean_rel": 1e-2,
        "grad_rel": math.inf,  # not tested: see grad_rel_fro (elementwise bf16 noise, support flips)
        "grad_rel_fro": 3e-1,
        "grad_vs_f32": 2e-2,  # JAX's bf16 gradient error <= 2 x PyTorch's bf16 error + this
        "update_far_lr": None,  # not tested: bf16 gradient noise flips the sign of small |g| >> eps
        "update_lr": 5e-2,
        "update_ulp": 2.0**-6,  # bfloat16 keeps 8 bits: p_new rounds at up to 2^-8 |p| per op (x4)
        "same_grad_lr": 5e-2,
        "beta_solver": 1.0,
        "kl_blend": 1e-2,
    },
}
DEFAULT_PROMPTS = ["1 + 2 =", "3 + 4 - 5 =", "6 7 8 9 0"]
ADAM_FAR = 1e3  # "far from Adam's eps": |clipped g| >= ADAM_FAR * eps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trb_jax.tools.compare_torch",
                                     description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:]))  # fmt: skip
    parser.add_argument("--mode", choices=MODES, default="logits")
    parser.add_argument("--checkpoint", help="logits mode: checkpoint directory or Hugging Face Hub id")
    parser.add_argument("--student", help="student checkpoint directory (or Hub id)")
    parser.add_argument("--teacher", help="teacher checkpoint directory (or Hub id)")
    parser.add_argument("--toy", action="store_true", help="the shipped toy pair (trb_jax/toy/assets)")
    parser.add_argument("--dtype", choices=sorted(DEFAULT_TOLERANCE), default="float32",
                        help="parameters and compute, both frameworks")
    parser.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS,
                        help="prompt texts (a prompt the tokenizer cannot encode falls back to random ids)")
    parser.add_argument("--num-random", type=int, default=3, help="random-id prompts when there is no tokenizer")
    parser.add_argument("--length", type=int, default=16, help="length of random-id prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=None,
                        help="logits mode: max allowed per-token KL(torch || jax)")
    parser.add_argument("--out", help="write the full report as JSON here")
    group = parser.add_argument_group("train-step and blend")
    group.add_argument("--response-length", type=int, default=16, help="T: greedy student tokens")
    group.add_argument("--top-k", type=int, default=16)
    group.add_argument("--no-renormalize", action="store_true",
                       help="top-k partial sum with full-vocabulary probabilities (default: renormalised)")
    group.add_argument("--chunk-size", type=int, default=8, help="JAX train step: positions per logits chunk")
    group.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    group.add_argument("--warmup-steps", type=int, default=0)
    group.add_argument("--decay-steps", type=int, default=1000)
    group.add_argument("--weight-decay", type=float, default=0.1)
    group.add_argument("--clip-norm", type=float, default=1.0)
    group.add_argument("--eps", type=float, default=0.1, help="blend: the trust-region budget")
    group.add_argument("--solver", choices=("bisection", "newton"), default="bisection", help="blend: JAX solver")
    group.add_argument("--solver-tol", type=float, default=1e-6, help="blend: JAX solver bracket width")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Inputs


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()


def _load_tokenizer(directory: Path):
    if not _has_tokenizer(directory):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _encode(tokenizer, text: str, vocab_size: int) -> list[int] | None:
    """The ids of `text`, or None when the tokenizer cannot encode it faithfully (a closed
    vocabulary raises or maps to its unknown token)."""
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    except Exception:  # tokenizers raises plain Exceptions ("Missing [UNK] token") here
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and unk in ids) or max(ids) >= vocab_size:
        return None
    return list(ids)


def prompt_rows(tokenizer, args: argparse.Namespace, vocab_size: int) -> tuple[list[list[int]], str]:
    """Prompt ids per row and a description of where they came from."""
    rng = np.random.default_rng(args.seed)

    def random_row():
        return [int(i) for i in rng.integers(0, vocab_size, size=args.length)]

    if tokenizer is None:
        rows = [random_row() for _ in range(args.num_random)]
        return rows, f"random ids (seed {args.seed}), {args.num_random} x {args.length}"
    rows, fallback = [], 0
    for text in args.prompts:
        ids = _encode(tokenizer, text, vocab_size)
        if ids is None:
            fallback += 1
            ids = random_row()
        rows.append(ids)
    source = f"tokenizer, {len(rows)} prompts"
    if fallback:
        source += f" ({fallback} not encodable: random ids, seed {args.seed})"
    return rows, source


def left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), pad, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, row in enumerate(rows):
        ids[i, t - len(row) :] = row
        mask[i, t - len(row) :] = 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    pad = None if tokenizer is None else tokenizer.pad_token_id
    return 0 if pad is None else int(pad)


def make_batch(directory: Path, args: argparse.Namespace, vocab_size: int):
    """(input_ids_bt int32, attention_mask_bt int32, source description); left-padded."""
    tokenizer = _load_tokenizer(directory)
    rows, source = prompt_rows(tokenizer, args, vocab_size)
    ids, mask = left_pad(rows, _pad_id(tokenizer))
    return ids, mask, source


def eos_ids(directory: Path, tokenizer) -> list[int]:
    """A model's native stop ids: the tokenizer's EOS, then generation_config.json's."""
    ids = [] if tokenizer is None or tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if path.is_file():
            extra = json.loads(path.read_text()).get("eos_token_id")
            for i in [extra] if isinstance(extra, int) else (extra or []):
                if int(i) not in ids:
                    ids.append(int(i))
            if ids:
                break
    return ids


# ---------------------------------------------------------------------------------------------
# Reporting


def _check(name: str, value: float, tolerance: float) -> dict[str, Any]:
    ok = bool(np.isfinite(value) and value <= tolerance)
    return {"check": name, "value": float(value), "tolerance": float(tolerance), "ok": ok}


def _print_checks(checks: list[dict[str, Any]]) -> None:
    print("| check | value | tolerance | |")
    print("|---|---|---|---|")
    for c in checks:
        name = c["check"].replace("|", "\\|")  # a markdown table cell
        print(f"| {name} | {c['value']:.3e} | {c['tolerance']:.1e} | {'ok' if c['ok'] else 'FAIL'} |")


def _json_default(x):
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x))


# ---------------------------------------------------------------------------------------------
# logits mode


def torch_logits(directory: Path, dtype: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    from trb_jax.tools import torch_opd

    model = torch_opd.load_model(directory, dtype)
    with torch.inference_mode():
        return torch_opd.logits(model, ids, mask).numpy()


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


def run_logits(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    import jax.numpy as jnp

    tolerance = DEFAULT_TOLERANCE[args.dtype] if args.tolerance is None else args.tolerance
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
    return {"checkpoint": str(directory), "source": source, "metrics": metrics,
            "checks": [_check("max per-token KL(torch || jax)", metrics["max_kl"], tolerance)]}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The pair: models, EOS map, batch


def load_pair(args: argparse.Namespace) -> dict[str, Any]:
    """Both checkpoints in both frameworks, the EOS map and the comparison batch."""
    from trb_jax.blending import EosMap
    from trb_jax.tools import torch_opd

    s_dir = checkpoint.resolve_checkpoint_dir(args.student)
    t_dir = checkpoint.resolve_checkpoint_dir(args.teacher)
    s_jax = checkpoint.from_pretrained(s_dir, dtype=args.dtype)
    t_jax = checkpoint.from_pretrained(t_dir, dtype=args.dtype)
    vocab = s_jax.config.vocab_size
    if t_jax.config.vocab_size != vocab:
        raise ValueError(f"student and teacher must share the vocabulary: vocab_size {vocab} vs "
                         f"{t_jax.config.vocab_size}")  # fmt: skip
    tok_s, tok_t = _load_tokenizer(s_dir), _load_tokenizer(t_dir)
    if tok_s is not None and tok_t is not None and tok_s.get_vocab() != tok_t.get_vocab():
        raise ValueError("the student and teacher tokenizers map tokens to different ids")
    s_eos, t_eos = eos_ids(s_dir, tok_s), eos_ids(t_dir, tok_t)
    eos = EosMap.from_ids(s_eos or t_eos, t_eos or s_eos) if (s_eos or t_eos) else None
    s_torch = torch_opd.load_model(s_dir, args.dtype)
    rows, source = prompt_rows(tok_s, args, vocab)
    prompt_ids, prompt_mask = left_pad(rows, _pad_id(tok_s))
    t = args.response_length
    native = s_eos[0] if s_eos else None
    response = torch_opd.greedy_response(s_torch, prompt_ids, prompt_mask, t, eos, native).astype(np.int32)
    stops = np.isin(response, list(eos.eos_ids)) if eos is not None else np.zeros_like(response, bool)
    # a token counts up to and including the row's first stop, as in the rollout
    response_mask = np.cumsum(np.cumsum(stops, axis=1), axis=1) <= 1
    ids = np.concatenate([prompt_ids, response], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(response)], axis=1)
    return {"s_dir": s_dir, "t_dir": t_dir, "s_jax": s_jax, "t_jax": t_jax, "s_torch": s_torch,
            "eos": eos, "source": source, "ids": ids, "mask": mask, "response_mask": response_mask}  # fmt: skip


def _describe(pair: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    eos = pair["eos"]
    return {"student": str(pair["s_dir"]), "teacher": str(pair["t_dir"]), "dtype": args.dtype,
            "inputs": pair["source"], "batch": list(pair["ids"].shape),
            "response_tokens": int(pair["response_mask"].sum()),
            "eos": None if eos is None else {"stop_id": eos.stop_id, "eos_ids": list(eos.eos_ids)}}  # fmt: skip


def _print_header(info: dict[str, Any]) -> None:
    print(f"student: {info['student']}\nteacher: {info['teacher']}")
    print(f"dtype: {info['dtype']}; inputs: {info['inputs']}; [prompt | response] batch {info['batch']}, "
          f"{info['response_tokens']} response tokens; EOS map: {info['eos']}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# train-step mode


def _f64(tree):
    import jax

    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def jax_train_step(pair: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One update by the project's jitted train step on the pair's batch (teacher mode).

    Returns the per-token loss and top-k ids (from `chunked_token_loss`, the function `loss_fn`
    averages), both models' raw response logits, the update (params after - before) and
    the step's metrics. The gradient is read back from the step's own first Adam moment:
    mu_1 = (1 - b1) * clip(g) with clip(g) = g * min(1, clip_norm / |g|), so no second
    differentiation of the loss is compiled (float32: ~1e-7 relative rounding; bf16: 2^-8).
    """
    import jax
    import jax.numpy as jnp
    import optax

    from trb_jax import objectives
    from trb_jax import train_step as ts

    s, t = pair["s_jax"], pair["t_jax"]
    optim = ts.OptimConfig(peak_lr=args.lr, warmup_steps=args.warmup_steps, decay_steps=args.decay_steps,
                           weight_decay=args.weight_decay, clip_norm=args.clip_norm)  # fmt: skip
    support = "unrenormalized" if args.no_renormalize else "renormalized"
    config = ts.TrainConfig(student=s.config, teacher=t.config, optim=optim, top_k=args.top_k,
                            chunk_size=args.chunk_size, eos=pair["eos"],
                            objective=objectives.ObjectiveConfig(name="opd", topk_support=support))  # fmt: skip
    ids, mask = jnp.asarray(pair["ids"]), jnp.asarray(pair["mask"])
    batch = ts.Batch(input_ids_bs=ids, attention_mask_bs=mask,
                     response_mask_bt=jnp.asarray(pair["response_mask"]),
                     teacher_input_ids_bs=ids, teacher_attention_mask_bs=mask)  # fmt: skip
    n = batch.response_mask_bt.shape[1]

    @jax.jit
    def per_token(params, teacher_params):
        # loss_fn's own pieces, to see the per-token values it averages
        teacher_x = ts.teacher_response_hidden(teacher_params, config, batch)
        x = ts.response_hidden(ts.hidden_states(params, config.student, batch.input_ids_bs,
                                                batch.attention_mask_bs), n)  # fmt: skip
        per_bt, _, scores = ts.chunked_token_loss(
            ts.lm_head(params, config.student), x, batch.input_ids_bs[:, -n:],
            objective=config.objective, chunk_size=config.chunk_size,
            vocab_chunk_size=config.vocab_chunk_size, top_k=config.top_k, eos=config.eos,
            teacher=ts.lm_head(teacher_params, config.teacher), teacher_x_btd=teacher_x,
        )  # fmt: skip
        z_s = ts.lm_head(params, config.student)(x)  # raw response logits, float32
        z_t = ts.lm_head(teacher_params, config.teacher)(teacher_x)
        return per_bt, scores["ids_btm"], z_s, z_t

    per_bt, ids_btk, z_s, z_t = per_token(s.params, t.params)
    out = {"loss_bt": np.asarray(per_bt, np.float64), "ids_btk": np.asarray(ids_btk), "config": config,
           "z_s": np.asarray(z_s, np.float64), "z_t": np.asarray(z_t, np.float64)}  # fmt: skip
    before = _f64(s.params)
    state = ts.init_train_state(s.params, config, jax.random.key(0))
    new_state, metrics = ts.jit_train_step(config)(state, batch, t.params)  # donates state (= s.params)
    out["metrics"] = {k: np.asarray(v) for k, v in metrics.items()}
    out["updates"] = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, new_state.params, before)
    out["params"] = before
    try:
        mu = optax.tree.get(new_state.opt_state, "mu")
    except (KeyError, ValueError) as e:
        raise ValueError(f"cannot read the gradient back from the train step's Adam state: {e}") from None
    norm = float(out["metrics"]["grad_norm"])
    clip = 1.0 if norm < args.clip_norm else args.clip_norm / norm
    out["grads"] = jax.tree.map(lambda x: np.asarray(x, np.float64) / ((1.0 - optim.b1) * clip), mu)
    return out


def _tensor_rows(jax_tree, torch_named: dict[str, np.ndarray], config) -> dict[str, tuple[np.ndarray, ...]]:
    """{HF name: (jax array, torch array)} with JAX's tree mapped to HF names and layouts."""
    hf = checkpoint.params_to_hf(jax_tree, config)
    missing = sorted(set(hf) ^ set(torch_named))
    if missing:
        raise ValueError(f"JAX and torch parameter names differ: {missing[:5]}")
    return {name: (hf[name], np.asarray(torch_named[name], np.float64).reshape(hf[name].shape)) for name in hf}


def _max_abs_diff(a, b):
    """max |a - b| over the last axis where both are finite (EOS-merged logits have -inf slots)."""
    both = np.isfinite(a) & np.isfinite(b)
    return np.max(np.where(both, np.abs(np.where(both, a, 0.0) - np.where(both, b, 0.0)), 0.0), axis=-1)


def loss_sensitivity(z_s, z_t, ids_btk, loss_bt, delta_s, delta_t, *, renormalize: bool):
    """How far the per-token loss may move when the logits move by delta_s / delta_t (float64).

    L = sum_i p_i (a_i - b_i) on the support (a, b the student's / teacher's log-probs there),
    dL/dz_i = p_i (a_i - b_i - L) and dL/dw_i = -(p_i - q_i), so to first order
    |dL| <= delta_s (E_p|a - b| + |L|) + 2 delta_t; x2 margin.
    """
    def support_log_probs(z):
        lp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
        lp = np.take_along_axis(lp, ids_btk, axis=-1)
        return lp - np.logaddexp.reduce(lp, axis=-1, keepdims=True) if renormalize else lp

    a, b = support_log_probs(z_s), support_log_probs(z_t)
    p = np.exp(a)
    gap = np.where(p > 0, np.abs(np.where(p > 0, a - b, 0.0)), 0.0)
    spread = np.sum(p * np.where(np.isfinite(gap), gap, 0.0), axis=-1)
    return 2.0 * (delta_s * (spread + np.abs(loss_bt)) + 2.0 * delta_t)


def adam_direction(g, eps):
    """g / (|g| + eps): the first AdamW update of a gradient element, in units of -lr (float64)."""
    return g / (np.abs(g) + eps)


def run_train_step(pair: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from trb_jax.tools import torch_opd

    tol = TOLERANCES[args.dtype]
    m = pair["response_mask"]
    jx = jax_train_step(pair, args)  # donates the JAX student's params
    eos = pair["eos"]

    def merged(z):  # EOS-merged float64 NumPy logits
        return torch_opd.merge_eos(torch.as_tensor(z, dtype=torch.float64), eos).numpy()

    z_j, zt_j = merged(jx["z_s"]), merged(jx["z_t"])
    # The loss function alone: torch_opd's loss (float64) on JAX's own logits.
    loss_on_jax, ids_on_jax = torch_opd.opd_token_loss(
        torch.as_tensor(jx["z_s"], dtype=torch.float64), torch.as_tensor(jx["z_t"], dtype=torch.float64),
        top_k=args.top_k, eos=eos, renormalize=not args.no_renormalize)  # fmt: skip
    loss_on_jax = loss_on_jax.numpy()
    same_ids = np.all(np.sort(ids_on_jax.numpy(), -1) == np.sort(jx["ids_btk"], -1), axis=-1) & m
    fn_diff = np.abs(jx["loss_bt"] - loss_on_jax) / np.maximum(1.0, np.abs(loss_on_jax))
    config = jx["config"]
    lr = torch_opd.warmup_cosine_lr(0, peak_lr=args.lr, warmup_steps=args.warmup_steps,
                                    decay_steps=args.decay_steps)  # fmt: skip
    adam_eps = config.optim.eps
    hyper = dict(lr=lr, b1=config.optim.b1, b2=config.optim.b2, eps=adam_eps,
                 weight_decay=args.weight_decay, clip_norm=args.clip_norm)  # fmt: skip
    batch = {"input_ids_bs": pair["ids"], "attention_mask_bs": pair["mask"],
             "teacher_input_ids_bs": pair["ids"], "teacher_attention_mask_bs": pair["mask"],
             "response_mask_bt": pair["response_mask"]}  # fmt: skip
    t_torch = torch_opd.load_model(pair["t_dir"], args.dtype)
    th = torch_opd.opd_update(pair["s_torch"], t_torch, batch, top_k=args.top_k, eos=pair["eos"],
                              renormalize=not args.no_renormalize, **hyper)  # fmt: skip
    ref_grads = None
    if args.dtype != "float32":  # bf16: both frameworks' gradient errors against float32 torch
        ref = torch_opd.opd_update(torch_opd.load_model(pair["s_dir"], "float32"),
                                   torch_opd.load_model(pair["t_dir"], "float32"), batch, top_k=args.top_k,
                                   eos=pair["eos"], renormalize=not args.no_renormalize, **hyper)  # fmt: skip
        ref_grads = ref["grads"]
    # The optimizer alone: torch's clip + AdamW on JAX's gradients, from the same start.
    fresh = torch_opd.load_model(pair["s_dir"], args.dtype)
    torch_opd.set_grads(fresh, checkpoint.params_to_hf(jx["grads"], config.student))
    same_grad = torch_opd.clip_adamw_step(fresh, **hyper)

    # Top-k support: a position is ambiguous when the student's k-th and (k+1)-th EOS-merged logits
    # are closer than the two frameworks' logit difference there (bf16: often); elsewhere the
    # supports must agree, and the per-token loss is compared where they do.
    k = args.top_k
    z_t = th["student_logits_btv"].astype(np.float64)
    delta = _max_abs_diff(z_t, z_j)
    zt_t = th["teacher_logits_btv"].astype(np.float64)
    delta_t = _max_abs_diff(zt_t, zt_j)
    z_sorted = -np.sort(-np.where(np.isfinite(z_t), z_t, -1e30), axis=-1)
    gap = z_sorted[..., k - 1] - z_sorted[..., k] if k < z_t.shape[-1] else np.full(m.shape, np.inf)
    clear = m & (gap > 2.0 * delta)
    same_support = np.all(np.sort(jx["ids_btk"], -1) == np.sort(th["ids_btk"], -1), axis=-1)
    compared = m & same_support
    loss_diff = np.abs(jx["loss_bt"] - th["loss_bt"])
    loss_allowed = (tol["loss_rel"] * np.maximum(1.0, np.abs(th["loss_bt"]))
                    + loss_sensitivity(z_t, zt_t, th["ids_btk"], th["loss_bt"], delta, delta_t,
                                       renormalize=not args.no_renormalize))  # fmt: skip
    jax_loss = float(jx["metrics"]["loss"])
    mean_bt = float(np.sum(jx["loss_bt"] * m) / max(m.sum(), 1))  # what loss_fn's masked_mean gives

    grads = _tensor_rows(jx["grads"], th["grads"], config.student)
    updates = _tensor_rows(jx["updates"], th["updates"], config.student)
    params = checkpoint.params_to_hf(jx["params"], config.student)
    clip_j = min(1.0, args.clip_norm / max(float(jx["metrics"]["grad_norm"]), 1e-30))
    clip_t = min(1.0, args.clip_norm / max(th["grad_norm"], 1e-30))
    rows = []
    worst = {"grad": 0.0, "grad_fro": 0.0, "far": -np.inf, "explained": -np.inf, "same": -np.inf,
             "vs_f32": -np.inf}
    far_total = near_total = 0
    for name, (g_j, g_t) in grads.items():
        u_j, u_t = updates[name]
        u_same = np.asarray(same_grad["updates"][name], np.float64).reshape(u_j.shape)
        ulp = tol["update_ulp"] * np.abs(params[name])
        dg, du, du_same = np.abs(g_j - g_t), np.abs(u_j - u_t), np.abs(u_j - u_same)
        far = np.minimum(np.abs(g_j) * clip_j, np.abs(g_t) * clip_t) >= ADAM_FAR * adam_eps
        explained = lr * np.abs(adam_direction(g_j * clip_j, adam_eps) - adam_direction(g_t * clip_t, adam_eps))
        far_total += int(far.sum())
        near_total += int((~far).sum())
        row = {
            "tensor": name, "shape": list(g_j.shape),
            "grad_max_abs": float(dg.max()), "grad_rel": float(dg.max() / max(np.abs(g_t).max(), 1e-30)),
            "grad_rel_fro": float(np.linalg.norm(dg) / max(np.linalg.norm(g_t), 1e-30)),
            "update_max_abs": float(du.max()), "update_rel": float(du.max() / max(np.abs(u_t).max(), 1e-30)),
            "update_far_max_abs": float(du[far].max()) if far.any() else 0.0,
            "near_eps_elements": int((~far).sum()),
            "same_grad_max_abs": float(du_same.max()),
        }  # fmt: skip
        if ref_grads is not None:
            g_ref = np.asarray(ref_grads[name], np.float64).reshape(g_j.shape)
            scale = max(np.linalg.norm(g_ref), 1e-30)
            row["grad_err_vs_f32_jax"] = float(np.linalg.norm(g_j - g_ref) / scale)
            row["grad_err_vs_f32_torch"] = float(np.linalg.norm(g_t - g_ref) / scale)
            worst["vs_f32"] = max(worst["vs_f32"], row["grad_err_vs_f32_jax"] - 2.0 * row["grad_err_vs_f32_torch"])
        rows.append(row)
        worst["grad"] = max(worst["grad"], row["grad_rel"])
        worst["grad_fro"] = max(worst["grad_fro"], row["grad_rel_fro"])
        if far.any():
            worst["far"] = max(worst["far"], float((du - ulp)[far].max()))
        worst["explained"] = max(worst["explained"], float((du - explained - ulp).max()))
        worst["same"] = max(worst["same"], float((du_same - ulp).max()))
    ulp_txt = f"{tol['update_ulp']:.1e} abs(p)"
    checks = [
        _check("loss function on JAX's logits: abs diff / max(1, loss), worst token",
               float(fn_diff[same_ids].max()), tol["loss_fn_rel"]),
        _check("JAX per-token losses: masked mean vs the step's loss, / max(1, loss)",
               abs(mean_bt - jax_loss) / max(1.0, abs(jax_loss)), tol["loss_fn_rel"]),
        _check("per-token loss: abs diff - allowance, same support (nats)",
               float((loss_diff - loss_allowed)[compared].max()), 0.0),
        _check("loss (mean): abs diff / max(1, loss)", abs(jax_loss - th["loss"]) / max(1.0, abs(th["loss"])),
               tol["loss_mean_rel"]),
        _check("top-k supports differing at unambiguous positions", float(np.sum(clear & ~same_support)), 0.0),
        _check("gradient rel (max abs diff / max abs), worst tensor", worst["grad"], tol["grad_rel"]),
        _check("gradient rel (Frobenius), worst tensor", worst["grad_fro"], tol["grad_rel_fro"]),
        _check("grad norm rel diff", abs(float(jx["metrics"]["grad_norm"]) - th["grad_norm"]) / th["grad_norm"],
               tol["grad_rel_fro"]),
        _check("learning rate rel diff", abs(float(jx["metrics"]["learning_rate"]) - lr) / max(lr, 1e-30), 1e-6),
        _check(f"update: abs diff - {ulp_txt} - lr abs(d adam dir), / lr", worst["explained"] / lr, tol["update_lr"]),
        _check(f"update on the same gradients: abs diff - {ulp_txt}, / lr", worst["same"] / lr, tol["same_grad_lr"]),
    ]  # fmt: skip
    if ref_grads is not None:
        checks.insert(len(checks) - 4, _check(
            "gradient error vs float32 torch (Frobenius): JAX's - 2 x torch's, worst tensor", worst["vs_f32"],
            tol["grad_vs_f32"]))  # fmt: skip
    checks = [c for c in checks if np.isfinite(c["tolerance"])]  # inf: reported, not a bf16 check
    if tol["update_far_lr"] is not None:
        name = f"update where abs(g) >= {ADAM_FAR:g} adam eps: max abs diff - {ulp_txt}"
        checks.insert(len(checks) - 2, _check(name, worst["far"], tol["update_far_lr"] * lr))
    summary = {
        "loss_jax": jax_loss, "loss_torch": th["loss"], "grad_norm_jax": float(jx["metrics"]["grad_norm"]),
        "grad_norm_torch": th["grad_norm"], "lr_jax": float(jx["metrics"]["learning_rate"]), "lr_torch": lr,
        "per_token_loss_max_abs": float(loss_diff[compared].max()),
        "per_token_loss_max_rel": float(loss_diff[compared].max() / max(np.abs(th["loss_bt"][m]).max(), 1e-30)),
        "positions": int(m.sum()), "support_agreement": float(same_support[m].mean()),
        "loss_fn_on_jax_logits_max_rel": float(fn_diff[same_ids].max()),
        "loss_fn_positions_compared": int(same_ids.sum()),
        "ambiguous_positions": int((m & ~clear).sum()), "student_logit_max_abs_diff": float(delta[m].max()),
        "teacher_logit_max_abs_diff": float(delta_t[m].max()),
        "per_token_loss_allowance_max": float(loss_allowed[compared].max()),
        "grad_rel_max": worst["grad"], "grad_rel_fro_max": worst["grad_fro"],
        "grad_err_vs_f32_excess": None if ref_grads is None else worst["vs_f32"],
        "update_far_elements": far_total, "update_near_eps_elements": near_total,
        "update_max_abs_far": max(r["update_far_max_abs"] for r in rows),
        "update_max_abs_all": max(r["update_max_abs"] for r in rows),
        "same_grad_update_max_abs": max(r["same_grad_max_abs"] for r in rows),
    }  # fmt: skip
    return {"summary": summary, "tensors": rows, "checks": checks,
            "loss_bt": {"jax": jx["loss_bt"], "torch": th["loss_bt"], "mask": m}}  # fmt: skip


def print_train_step(result: dict[str, Any]) -> None:
    s = result["summary"]
    print(f"loss: jax {s['loss_jax']:.7g}, torch {s['loss_torch']:.7g}; grad norm: jax {s['grad_norm_jax']:.7g}, "
          f"torch {s['grad_norm_torch']:.7g}; lr: jax {s['lr_jax']:.6g}, torch {s['lr_torch']:.6g}")
    print(f"per-token loss: max abs diff {s['per_token_loss_max_abs']:.3e} (rel {s['per_token_loss_max_rel']:.3e}); "
          f"top-k support agreement {s['support_agreement']:.3f}")
    print(f"update elements far from Adam's eps: {s['update_far_elements']}, near: {s['update_near_eps_elements']}")
    print("| tensor | grad max abs | grad rel | grad rel (Frobenius) | update max abs | update rel | update max abs, far "
          "| same-grad max abs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["tensors"]:
        print(f"| {r['tensor']} | {r['grad_max_abs']:.2e} | {r['grad_rel']:.2e} | {r['grad_rel_fro']:.2e} | "
              f"{r['update_max_abs']:.2e} | {r['update_rel']:.2e} | {r['update_far_max_abs']:.2e} | "
              f"{r['same_grad_max_abs']:.2e} |")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# blend mode


def blend_tolerance(beta, var_r, delta, eps, solver_tol):
    """Allowed |beta*_jax - beta*_torch| per position (NumPy float64 arrays).

    solver_tol: JAX's bracket width. (1e-5 eps + 1e-9) / D'(beta): the solver's float32 D is
    within eps (1 +- 1e-5) +- 1e-9, moved to beta through D' = beta Var_mu(r). 4 beta delta /
    std_mu(r): logits that differ by delta move r by <= 2 delta and D by ~beta^2 Cov_mu(r, dr)
    <= 2 beta^2 std_mu(r) delta, i.e. beta by 2 beta delta / std_mu(r) (x2 margin). Rows at
    beta* = 1 (KL(pi_T || pi_S) <= eps) get the same allowance: D(1) near eps flips them.
    """
    slope = np.maximum(beta * var_r, 1e-300)
    std = np.sqrt(np.maximum(var_r, 1e-300))
    return solver_tol + (1e-5 * eps + 1e-9) / slope + 4.0 * beta * delta / std


def run_blend(pair: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import jax.numpy as jnp
    import torch

    from trb_jax import blending
    from trb_jax.tools import torch_opd

    tol = TOLERANCES[args.dtype]
    eos, ids, mask = pair["eos"], pair["ids"], pair["mask"]
    m = pair["response_mask"]
    n = m.shape[1]
    t_torch = torch_opd.load_model(pair["t_dir"], args.dtype)
    with torch.inference_mode():
        zs_t = torch_opd.response_logits(pair["s_torch"], ids, mask, n)
        zt_t = torch_opd.response_logits(t_torch, ids, mask, n)
    ref = torch_opd.trb_blend(zs_t, zt_t, args.eps, eos=eos)

    def jax_logits(model):
        z = model(jnp.asarray(ids), jnp.asarray(mask))[:, -n - 1 : -1]
        return blending.merge_eos(z, eos) if eos is not None else z

    zs_j, zt_j = jax_logits(pair["s_jax"]), jax_logits(pair["t_jax"])
    sol = blending.trust_region_blend(zs_j, zt_j, args.eps, solver=args.solver, tol=args.solver_tol)
    beta_j, kl_j = np.asarray(sol.beta, np.float64), np.asarray(sol.kl, np.float64)
    log_mu_j = np.asarray(sol.log_probs, np.float64)
    beta_t, kl_t = ref["beta"].numpy(), ref["kl"].numpy()
    log_mu_t, log_s, log_t = ref["log_mu"].numpy(), ref["log_s"].numpy(), ref["log_t"].numpy()

    # conditioning of beta*, from the float64 reference at its beta*
    mu_t = np.exp(log_mu_t)
    finite = np.isfinite(log_s) & np.isfinite(log_t)
    r = np.where(finite, np.where(finite, log_t, 0.0) - np.where(finite, log_s, 0.0), 0.0)
    mean_r = np.sum(mu_t * r, axis=-1, keepdims=True)
    var_r = np.sum(mu_t * (r - mean_r) ** 2, axis=-1)
    delta = np.maximum(  # the two frameworks' logit difference per position (either model)
        _max_abs_diff(torch_opd.merge_eos(zs_t, eos).numpy().astype(np.float64), np.asarray(zs_j, np.float64)),
        _max_abs_diff(torch_opd.merge_eos(zt_t, eos).numpy().astype(np.float64), np.asarray(zt_j, np.float64)))
    allowed = tol["beta_solver"] * blend_tolerance(beta_t, var_r, delta, args.eps, args.solver_tol)
    d_beta = np.abs(beta_j - beta_t)
    # float32 log mu* sums to 1 only to ~1e-7: renormalise in float64 before the KL
    finite_j = np.isfinite(log_mu_j)
    lmj = np.where(finite_j, log_mu_j, -np.inf)
    lmj = lmj - np.logaddexp.reduce(lmj, axis=-1, keepdims=True)
    both = np.isfinite(log_mu_t) & finite_j
    diff = np.where(both, log_mu_t, 0.0) - np.where(both, lmj, 0.0)
    escapes = np.any(np.isfinite(log_mu_t) & ~finite_j & (mu_t > 0), axis=-1)
    kl_mu = np.where(escapes, np.inf, np.sum(np.where(both, mu_t * diff, 0.0), axis=-1))
    d_log_mu = np.where(both & (mu_t >= 1e-6), np.abs(diff), 0.0).max(-1)
    positions = []
    for b, j in zip(*np.nonzero(m)):
        positions.append({"row": int(b), "pos": int(j), "token": int(ids[b, ids.shape[1] - n + j]),
                          "beta_jax": beta_j[b, j], "beta_torch": beta_t[b, j], "beta_allowed": allowed[b, j],
                          "kl_jax": kl_j[b, j], "kl_torch": kl_t[b, j],
                          "kl_mu_torch_jax": kl_mu[b, j], "log_mu_max_abs": d_log_mu[b, j]})  # fmt: skip
    excess = (d_beta - allowed)[m]
    interior = (beta_t > 0) & (beta_t < 1) & m
    checks = [
        _check("beta*: abs(jax - torch) - allowance, worst position", float(excess.max()), 0.0),
        _check("KL(mu*_jax || pi_S) - eps (float32 solver)", float((kl_j[m] - args.eps * (1 + 1e-5) - 1e-9).max()), 0.0),
        _check("KL(mu*_torch || mu*_jax), worst position", float(kl_mu[m].max()), tol["kl_blend"]),
    ]  # fmt: skip
    summary = {
        "eps": args.eps, "positions": int(m.sum()), "interior_positions": int(interior.sum()),
        "beta1_positions": int(((beta_t == 1) & m).sum()), "beta_max_abs_diff": float(d_beta[m].max()),
        "beta_mean_torch": float(beta_t[m].mean()), "kl_max_abs_diff": float(np.abs(kl_j - kl_t)[m].max()),
        "kl_mu_max": float(kl_mu[m].max()), "log_mu_max_abs_diff": float(d_log_mu[m].max()),
        "logit_max_abs_diff": float(delta[m].max()),
    }  # fmt: skip
    return {"summary": summary, "positions": positions, "checks": checks}


def print_blend(result: dict[str, Any], limit: int = 12) -> None:
    s = result["summary"]
    print(f"eps {s['eps']}: {s['positions']} positions ({s['interior_positions']} interior beta*, "
          f"{s['beta1_positions']} at beta* = 1); max |d beta*| {s['beta_max_abs_diff']:.3e}, max |d KL| "
          f"{s['kl_max_abs_diff']:.3e}, max KL(mu*_torch || mu*_jax) {s['kl_mu_max']:.3e}, max |d log mu*| "
          f"(mu* >= 1e-6) {s['log_mu_max_abs_diff']:.3e}")  # fmt: skip
    rows = sorted(result["positions"], key=lambda p: -abs(p["beta_jax"] - p["beta_torch"]))[:limit]
    print("| row | pos | beta* jax | beta* torch | allowed | KL jax | KL torch | KL(mu*_t \\|\\| mu*_j) | max d log mu* |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in sorted(rows, key=lambda p: (p["row"], p["pos"])):
        print(f"| {p['row']} | {p['pos']} | {p['beta_jax']:.7f} | {p['beta_torch']:.7f} | {p['beta_allowed']:.1e} | "
              f"{p['kl_jax']:.6f} | {p['kl_torch']:.6f} | {p['kl_mu_torch_jax']:.1e} | {p['log_mu_max_abs']:.1e} |")  # fmt: skip
    if len(result["positions"]) > limit:
        print(f"({limit} positions with the largest |d beta*| shown; all in --out)")


# ---------------------------------------------------------------------------------------------


def _toy_dirs() -> tuple[str, str]:
    from trb_jax.toy import build

    return str(build.ASSETS_DIR / "student"), str(build.ASSETS_DIR / "teacher")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.toy:
        args.student, args.teacher = _toy_dirs()
    report: dict[str, Any] = {"mode": args.mode, "dtype": args.dtype}
    if args.mode == "logits":
        dirs = [args.checkpoint] if args.checkpoint else [d for d in (args.student, args.teacher) if d]
        if not dirs:
            raise ValueError("--mode logits needs --checkpoint (or --student / --teacher, or --toy)")
        report["checkpoints"] = []
        for i, d in enumerate(dirs):
            if i:
                print()
            report["checkpoints"].append(run_logits(checkpoint.resolve_checkpoint_dir(d), args))
        report["checks"] = [c for r in report["checkpoints"] for c in r["checks"]]
        return report
    if not (args.student and args.teacher):
        raise ValueError(f"--mode {args.mode} needs --student and --teacher (or --toy)")
    if args.response_length < 1:
        raise ValueError(f"--response-length must be >= 1, got {args.response_length}")
    pair = load_pair(args)
    info = _describe(pair, args)
    report.update(info)
    _print_header(info)
    if args.mode == "train-step":
        result = run_train_step(pair, args)
        print_train_step(result)
        report["settings"] = {"top_k": args.top_k, "renormalize": not args.no_renormalize, "lr": args.lr,
                              "weight_decay": args.weight_decay, "clip_norm": args.clip_norm,
                              "chunk_size": args.chunk_size}  # fmt: skip
    else:
        result = run_blend(pair, args)
        print_blend(result)
        report["settings"] = {"eps": args.eps, "solver": args.solver, "solver_tol": args.solver_tol}
    report.update(result)
    _print_checks(result["checks"])
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (ValueError, OSError, ImportError) as e:  # CheckpointError is a ValueError
        # The CLIs' one error line (errors.one_line); exit 2 keeps "could not compare" apart
        # from 1, "compared and out of tolerance".
        print(f"compare_torch: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    ok = all(c["ok"] for c in report["checks"])
    if args.mode != "logits":
        failed = [c["check"] for c in report["checks"] if not c["ok"]]
        print("PASS: every check within its tolerance" if ok else f"FAIL: {'; '.join(failed)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
        print(f"report: {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(cli_main(main)())

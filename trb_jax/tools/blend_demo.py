"""Show the trust-region blend on real pairs of distributions.

    python -m trb_jax.tools.blend_demo [--solver newton] [--eps 0.001 0.01 0.05 0.1]

1. The worked example of docs/method.md (pi_S = [0.7, 0.3], pi_T = [0.2, 0.8]): beta*, KL(mu*||pi_S) and the
   blended distribution for each budget, with the small-budget estimate sqrt(2 eps / Var).
2. A Qwen3-sized pair (V = 151,936, seeded LM-like logits, the two models' EOS tokens merged
   into one stop event), with the full teacher and with the teacher masked to its top-p 0.99
   nucleus: beta*, KL and the top
   tokens of pi_S, pi_T and mu* per budget.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from trb_jax.blending import EosMap, merge_eos, trust_region_blend

QWEN3_VOCAB = 151_936
ENDOFTEXT, IM_END = 151_643, 151_645  # Qwen3's <|endoftext|> and <|im_end|>


def _fmt(p) -> str:
    return "[" + ", ".join(f"{x:.4f}" for x in p) + "]"


def worked_example(eps_list, solver: str) -> None:
    pi_s, pi_t = np.array([0.7, 0.3]), np.array([0.2, 0.8])
    r = np.log(pi_t) - np.log(pi_s)
    var = float(np.sum(pi_s * r * r) - np.sum(pi_s * r) ** 2)
    s = jnp.log(jnp.asarray([pi_s] * len(eps_list), jnp.float32))
    t = jnp.log(jnp.asarray([pi_t] * len(eps_list), jnp.float32))
    res = trust_region_blend(s, t, jnp.asarray(eps_list, jnp.float32), solver=solver)
    kl_ts = float(np.sum(pi_t * (np.log(pi_t) - np.log(pi_s))))
    print(f"Worked example: pi_S = {_fmt(pi_s)}, pi_T = {_fmt(pi_t)}, "
          f"Var_piS(r) = {var:.5f}, KL(pi_T||pi_S) = {kl_ts:.6f}")
    print(f"{'eps':>8} {'beta*':>9} {'sqrt(2eps/Var)':>15} {'KL(mu*||pi_S)':>14}  mu*")
    for i, eps in enumerate(eps_list):
        mu = np.exp(np.asarray(res.log_probs[i]))
        print(f"{eps:8.4f} {float(res.beta[i]):9.5f} {np.sqrt(2 * eps / var):15.5f} "
              f"{float(res.kl[i]):14.6f}  {_fmt(mu)}")


def qwen3_sized_pair(eps_list, solver: str, top_p: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    # Zipf-like spread of logits, a correlated teacher, both with an EOS preference.
    base = -1.1 * np.log1p(rng.permutation(QWEN3_VOCAB)).astype(np.float32)
    s = 1.5 * base + rng.normal(size=QWEN3_VOCAB).astype(np.float32)
    t = 1.5 * base + 1.5 * rng.normal(size=QWEN3_VOCAB).astype(np.float32)
    s[ENDOFTEXT] = s.max() - 3.0  # the Base student might stop...
    t[IM_END] = t.max() - 1.0  # ...the chat teacher more likely, on its own stop token
    order = np.argsort(-t)
    p_t = np.exp(t[order] - t.max())
    keep = np.cumsum(p_t / p_t.sum()) <= top_p
    keep[0] = True
    t_masked = np.full_like(t, -np.inf)
    t_masked[order[keep]] = t[order[keep]]

    eos = EosMap.from_ids(student_eos=[ENDOFTEXT], teacher_eos=[IM_END, ENDOFTEXT])
    s_j = merge_eos(jnp.asarray(s), eos)
    t_j = merge_eos(jnp.asarray(t_masked), eos)
    n = len(eps_list)
    s_b, t_b = jnp.broadcast_to(s_j, (n, QWEN3_VOCAB)), jnp.broadcast_to(t_j, (n, QWEN3_VOCAB))
    eps = jnp.asarray(eps_list, jnp.float32)
    jax.block_until_ready(trust_region_blend(s_b, t_b, eps, solver=solver))  # compile
    t0 = time.perf_counter()
    res = jax.block_until_ready(trust_region_blend(s_b, t_b, eps, solver=solver))
    ms = 1e3 * (time.perf_counter() - t0)

    log_s = jax.nn.log_softmax(s_j)
    log_t = jax.nn.log_softmax(t_j)
    top = np.argsort(-np.asarray(log_t))[:6]
    print(f"\nQwen3-sized pair: V = {QWEN3_VOCAB:,}, teacher top-p {top_p} keeps {keep.sum():,} "
          f"tokens, EOS ids {eos.eos_ids} merged onto stop id {eos.stop_id}; "
          f"{n} rows solved in {ms:.1f} ms ({solver}).")
    in_both = np.isfinite(np.asarray(log_t))
    floor = -np.log(np.exp(np.asarray(log_s, np.float64))[in_both].sum())
    print(f"pi_S mass outside the teacher's support: D(0+) = -log pi_S(I) = {floor:.4f}; "
          "a budget below it keeps beta* = 0 (mu* = pi_S).")
    print("token ids        " + " ".join(f"{i:>9}" for i in top))
    print("pi_S             " + " ".join(f"{float(np.exp(log_s[i])):9.4f}" for i in top))
    print("pi_T             " + " ".join(f"{float(np.exp(log_t[i])):9.4f}" for i in top))
    for i, e in enumerate(eps_list):
        mu = np.exp(np.asarray(res.log_probs[i]))
        print(f"mu* eps={e:<7.4g}  " + " ".join(f"{mu[j]:9.4f}" for j in top)
              + f"   beta*={float(res.beta[i]):.5f} KL={float(res.kl[i]):.5f} "
              f"iters={int(res.iters[i])}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--solver", default="bisection", choices=["bisection", "newton"])
    parser.add_argument("--eps", type=float, nargs="+", default=[0.001, 0.01, 0.05, 0.1])
    args = parser.parse_args(argv)
    worked_example(args.eps, args.solver)
    for top_p in (1.0, 0.99):
        qwen3_sized_pair(args.eps, args.solver, top_p)


if __name__ == "__main__":
    main()

"""Evaluation: sample n responses per problem with the student, grade them, pass@1 / pass@k.

`evaluate_dataset` is what both the trainer (periodic evaluation) and `python -m
trb_jax.evaluate` call. Rows are problem x sample; every chunk of `batch_size` rows is padded
to the same width and row count, so one compiled rollout program serves a whole benchmark.
Keys are fold_in(rng, row id): a row's samples do not depend on the batch it lands in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from trb_jax import data as data_lib
from trb_jax import distributed
from trb_jax import rewards
from trb_jax.behaviors import make_knobs
from trb_jax.blending import EosMap
from trb_jax.models import qwen3
from trb_jax.rollout import Prompts, RolloutSpec, bucket_length, pad_prompts, rollout, row_keys

__all__ = ["EvalResult", "load_eval_problems", "sample_responses", "evaluate_dataset"]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """correct_pn: [problems, n] 0/1; metrics: pass@1, pass@k, mean response length, n."""

    name: str
    correct_pn: np.ndarray
    lengths_pn: np.ndarray
    metrics: dict[str, float]


def load_eval_problems(ds) -> tuple[list[str], list[str]]:
    """(problems, gold answers) of an EvalDataset (config.EvalDataset); answers are required."""
    problems, answers = data_lib.load_problems(data_lib.DataConfig(
        source=ds.source, split=ds.split, subset=ds.subset, prompt_field=ds.prompt_field,
        answer_field=ds.answer_field, max_examples=ds.max_examples))
    if ds.answer_after:
        answers = [a.split(ds.answer_after)[-1].strip() for a in answers]
    return problems, answers


def sample_responses(params, config: qwen3.Qwen3Config, prompt_ids: Sequence[Sequence[int]], *,
                     num_samples: int, spec: RolloutSpec, rng: jax.Array, pad_id: int,
                     temperature: float = 1.0, top_p: float = 1.0,
                     batch_size: int = 64, place=lambda tree: tree
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Student samples: (tokens [P, n, T] int32, lengths [P, n]); stop written as stop_id.

    place: maps the host prompt arrays (ids, mask) onto devices (the trainer passes a
    batch-sharded `jax.device_put` over its mesh; every process holds the same host rows).
    """
    if spec.behavior != "student":
        raise ValueError(f"evaluation samples the student; spec.behavior is {spec.behavior!r}")
    rows = [(p, j) for p in range(len(prompt_ids)) for j in range(num_samples)]
    width = bucket_length(max(len(ids) for ids in prompt_ids))
    knobs = make_knobs(temperature=temperature, top_p=top_p)
    T = spec.max_new_tokens
    tokens = np.zeros((len(prompt_ids), num_samples, T), np.int32)
    lengths = np.zeros((len(prompt_ids), num_samples), np.int32)
    chunk = min(batch_size, len(rows))
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        padded = part + [part[-1]] * (chunk - len(part))  # same row count: no recompile
        ids, mask = pad_prompts([prompt_ids[p] for p, _ in padded], pad_id=pad_id,
                                buckets=(width,))
        row_ids = np.arange(start, start + chunk, dtype=np.int64)
        prompts = Prompts(*place((ids, mask)))
        out = rollout(params, None, prompts, row_keys(rng, row_ids), knobs,
                      student_config=config, teacher_config=None, spec=spec)
        toks, lens = distributed.fetch(out.tokens_bt), distributed.fetch(out.lengths_b)
        for i, (p, j) in enumerate(part):
            tokens[p, j], lengths[p, j] = toks[i], lens[i]
    return tokens, lengths


def decode_responses(tokenizer, tokens_bt: np.ndarray, lengths_b: np.ndarray,
                     stop_id: int) -> list[str]:
    """Response texts without the stop token."""
    texts = []
    for toks, n in zip(tokens_bt, lengths_b):
        toks = [int(t) for t in toks[:int(n)] if int(t) != stop_id]
        texts.append(tokenizer.decode(toks, skip_special_tokens=True))
    return texts


def evaluate_dataset(name: str, problems: Sequence[str], answers: Sequence[str], *, params,
                     config: qwen3.Qwen3Config, tokenizer, eos: EosMap, student_eos_id: int,
                     grader: rewards.Grader, rng: jax.Array, num_samples: int,
                     max_new_tokens: int, ks: Sequence[int] = (1,), temperature: float = 1.0,
                     top_p: float = 1.0, batch_size: int = 64,
                     system_prompt: str = data_lib.DEFAULT_SYSTEM_PROMPT,
                     grade_timeout_s: float = 5.0, place=lambda tree: tree) -> EvalResult:
    """pass@1 (mean correctness over n samples, averaged over problems) and unbiased pass@k."""
    spec = RolloutSpec(behavior="student", max_new_tokens=max_new_tokens, eos=eos,
                       student_eos_id=student_eos_id, teacher_eos_id=student_eos_id)
    prompt_ids = [data_lib.encode_student(p, tokenizer, system_prompt) for p in problems]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else student_eos_id
    tokens, lengths = sample_responses(
        params, config, prompt_ids, num_samples=num_samples, spec=spec, rng=rng, pad_id=pad_id,
        temperature=temperature, top_p=top_p, batch_size=batch_size, place=place)
    n = num_samples
    texts = decode_responses(tokenizer, tokens.reshape(-1, max_new_tokens), lengths.reshape(-1),
                             eos.stop_id)
    golds = [a for a in answers for _ in range(n)]
    scores = grader.grade_batch(texts, golds, timeout_s=grade_timeout_s)
    correct = np.asarray(scores, np.float64).reshape(len(problems), n)
    metrics = {"pass@1": rewards.pass_at_1_mean(correct),
               "mean_length": float(lengths.mean()), "num_problems": float(len(problems)),
               "num_samples": float(n)}
    for k in ks:
        if k != 1:
            metrics[f"pass@{k}"] = rewards.pass_at_k_mean(correct, k)
    return EvalResult(name=name, correct_pn=correct, lengths_pn=lengths, metrics=metrics)

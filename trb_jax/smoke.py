"""The smoke world: tiny *random* Qwen3 student and teacher checkpoints plus toy prompts.

`make_smoke_world(directory)` writes, once (idempotent; a marker file records completion):

    directory/student/   config.json, model.safetensors, tokenizer files (eos <|endoftext|>)
    directory/teacher/   the same, wider, with the chat template (eos <|im_end|>)
    directory/train.jsonl, directory/test.jsonl   toy arithmetic problems with answers

It reuses the toy world's tokenizer and task generator (trb_jax.toy) but not its trained
models: the point is to exercise every code path (loading, EOS canonicalisation, rollouts,
grading, the train step, checkpoints, evaluation) in seconds, not to learn anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from trb_jax.models import checkpoint as hf_checkpoint
from trb_jax.models import qwen3
from trb_jax.toy import tasks, tokenizer

__all__ = ["SMOKE_STUDENT", "SMOKE_TEACHER", "make_smoke_world"]

_VOCAB = 128  # >= the toy tokenizer's ids; rows beyond it are never sampled much, and that's fine

SMOKE_STUDENT = qwen3.Qwen3Config(
    vocab_size=_VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=512)
SMOKE_TEACHER = qwen3.Qwen3Config(
    vocab_size=_VOCAB, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=12, tie_word_embeddings=False, max_position_embeddings=512)

_DONE = ".complete"


def make_smoke_world(directory: str | os.PathLike, *, seed: int = 0, n_train: int = 64,
                     n_test: int = 8) -> Path:
    """Builds the smoke world under `directory` unless it is already complete; returns it."""
    directory = Path(directory)
    if (directory / _DONE).exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    if len(tokenizer.vocabulary()) + len(tokenizer.SPECIAL_TOKENS) > _VOCAB:
        raise ValueError("the toy vocabulary outgrew the smoke models' vocab_size")
    key_s, key_t = jax.random.split(jax.random.key(seed))
    for name, config, key in (("student", SMOKE_STUDENT, key_s), ("teacher", SMOKE_TEACHER, key_t)):
        params = qwen3.init_params(config, key)
        hf_checkpoint.save_pretrained(qwen3.Qwen3CausalLM(params=params, config=config),
                                      directory / name)
    tokenizer.save_tokenizers(directory / "student", directory / "teacher")
    train, test = tasks.make_splits(tasks.TaskConfig(), n_train, n_test, seed=seed)
    tasks.write_jsonl(train, directory / "train.jsonl")
    tasks.write_jsonl(test, directory / "test.jsonl")
    (directory / _DONE).write_text("ok\n")
    return directory

"""Build (or fetch) the toy OPD world: data splits, a chat teacher and a weak Base student.

    python -m trb_jax.toy.build --out DIR            # the whole world into DIR (CPU, minutes)
    python -m trb_jax.toy.build --out DIR --eval     # ... then measure pass@1 of both models
    python -m trb_jax.toy.build --eval-only --out DIR  # pass@1 of an existing world
    python -m trb_jax.toy.build --world hard --eval  # the hard world (trb_jax/toy/assets_hard)

    world = ensure_toy_world()            # the shipped world (trb_jax/toy/assets) if present,
    world = ensure_toy_world(cache_dir)   # else the one cached in cache_dir, else builds it
    world.teacher_dir, world.student_dir, world.train_jsonl, world.test_jsonl
    world = ensure_toy_world(world="hard")  # the hard world: HARD_BUILD, HARD_ASSETS_DIR

Layout of a world directory:
  train.jsonl, test.jsonl   {"problem", "answer", "solution"} per line (disjoint problems)
  teacher/                  Qwen3 chat model: config.json, model.safetensors, tokenizer files
  student/                  Qwen3 Base model, same vocabulary, eos <|endoftext|>
  build.json                the BuildConfig it was built with (+ pass@1 when --eval ran)

The teacher is SFT'd on the train split in the teacher format (chat prompt + worked solution +
<|im_end|>). The student is smaller, trained for fewer steps, in the student format (plain
prompt + solution + <|endoftext|>) on problems whose worked solutions are wrong with probability
`student_noise` per step: it learns the format and most of the arithmetic but samples wrong
steps often, so its pass@1 is low but not zero and OPD from the teacher can raise it.
Everything is fixed by `BuildConfig.seed`; see docs/toy.md for the measured numbers.

The hard world (`HARD_BUILD`, docs/toy.md "The hard world"): 6-12 chained steps per problem,
both models trained on their own draws of the train stream (not shipped), length-bucketed
batches, a two-phase teacher (`PhasedModelSpec`), a student of the teacher's shape on solutions
with 20% wrong steps; `evaluate(..., prefix_stats=True)` adds the conditional-success ("doom")
statistics of `step_prefix_stats`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from trb_jax import data
from trb_jax.models import checkpoint, qwen3
from trb_jax.toy import pretrain, tasks, tokenizer

__all__ = [
    "ASSETS_DIR",
    "ModelSpec",
    "PhasedModelSpec",
    "BuildConfig",
    "ToyWorld",
    "DEFAULT_BUILD",
    "HardBuildConfig",
    "HARD_BUILD",
    "HARD_ASSETS_DIR",
    "HARD_MAX_NEW_TOKENS",
    "WORLDS",
    "world_config",
    "max_new_tokens",
    "step_prefix_stats",
    "model_config",
    "load_tokenizers",
    "build",
    "world_paths",
    "is_complete",
    "ensure_toy_world",
    "sample_responses",
    "pass_at_1",
    "evaluate",
    "main",
]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
MAX_NEW_TOKENS = 48  # the longest worked solution (4 steps) is 37 tokens + EOS
HARD_ASSETS_DIR = Path(__file__).resolve().parent / "assets_hard"
HARD_MAX_NEW_TOKENS = 240  # the hard world: the longest solution (12 steps) is 231 tokens + EOS


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A small Qwen3 shape (GQA 2, tied embeddings) and how long to train it."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int = 4
    num_kv_heads: int = 2
    train: pretrain.TrainSpec = pretrain.TrainSpec(steps=1000)


@dataclasses.dataclass(frozen=True)
class PhasedModelSpec(ModelSpec):
    """A ModelSpec trained in two phases: `train`, then `finetune` from the phase-1 weights
    with a fresh optimizer (its own warmup and cosine decay; batch order seeded seed + 100)."""

    finetune: pretrain.TrainSpec | None = None


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    task: tasks.TaskConfig = tasks.TaskConfig()
    n_train: int = 20_000
    n_test: int = 500
    student_noise: float = 0.3
    system_prompt: str = tokenizer.SYSTEM_PROMPT
    teacher: ModelSpec = ModelSpec(96, 3, 256, train=pretrain.TrainSpec(steps=1200, batch_size=32))
    student: ModelSpec = ModelSpec(64, 2, 128, train=pretrain.TrainSpec(steps=600, batch_size=32))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


DEFAULT_BUILD = BuildConfig()


@dataclasses.dataclass(frozen=True)
class HardBuildConfig(BuildConfig):
    """The hard world (`tasks.HardTaskConfig`: 6-12 dependent steps, 120-231 response tokens).

    Teacher and student are trained on their own draws of the train stream (n_teacher_train,
    n_student_train problems, regenerated from the seed, not shipped); the shipped train split
    (n_train) is the OPD prompt source. Batches are length-bucketed (`length_bucket` tokens).
    """

    world: str = "hard"
    task: tasks.HardTaskConfig = tasks.HardTaskConfig()
    n_train: int = 4_000
    n_test: int = 500
    n_teacher_train: int = 30_000
    n_student_train: int = 15_000
    student_noise: float = 0.2
    max_new_tokens: int = HARD_MAX_NEW_TOKENS
    length_bucket: int = 32
    # 1,000 steps reach 0.002 loss per response token (still 8% of greedy chains wrong under
    # teacher forcing); the second phase at a lower peak lr polishes the long chains.
    teacher: ModelSpec = PhasedModelSpec(
        96, 3, 256, train=pretrain.TrainSpec(steps=1000, batch_size=32),
        finetune=pretrain.TrainSpec(steps=600, batch_size=32, lr=1e-3, warmup_steps=50))
    # The teacher's shape and phase 1, on solutions with 20% wrong steps: a d 64 / 2-layer
    # student after 400 steps (loss 0.55) never learned to copy the problem (pass@1 0.016, the
    # first step wrong in every sample), so it had no right prefixes to condition on.
    student: ModelSpec = ModelSpec(96, 3, 256, train=pretrain.TrainSpec(steps=1000, batch_size=32))


HARD_BUILD = HardBuildConfig()

# world name -> (build config, shipped directory)
WORLDS = {"default": (DEFAULT_BUILD, ASSETS_DIR), "hard": (HARD_BUILD, HARD_ASSETS_DIR)}


def world_config(world: str = "default") -> tuple[BuildConfig, Path]:
    """(build config, shipped directory) of a named world ("default" or "hard")."""
    if world not in WORLDS:
        raise ValueError(f"unknown toy world {world!r}; known: {sorted(WORLDS)}")
    return WORLDS[world]


def max_new_tokens(config: BuildConfig) -> int:
    """Rollout length that fits the config's longest worked solution + EOS."""
    return getattr(config, "max_new_tokens", MAX_NEW_TOKENS)


@dataclasses.dataclass(frozen=True)
class ToyWorld:
    root: Path
    teacher_dir: Path
    student_dir: Path
    train_jsonl: Path
    test_jsonl: Path


def world_paths(root: str | os.PathLike) -> ToyWorld:
    root = Path(root)
    return ToyWorld(root, root / "teacher", root / "student", root / "train.jsonl",
                    root / "test.jsonl")


def is_complete(root: str | os.PathLike) -> bool:
    w = world_paths(root)
    files = [w.train_jsonl, w.test_jsonl]
    for d in (w.teacher_dir, w.student_dir):
        files += [d / "config.json", d / "model.safetensors", d / "tokenizer.json",
                  d / "tokenizer_config.json"]
    return all(f.is_file() for f in files)


def model_config(spec: ModelSpec, vocab_size: int) -> qwen3.Qwen3Config:
    return qwen3.Qwen3Config(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
        num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads, intermediate_size=spec.intermediate_size,
        tie_word_embeddings=True, rope_theta=10_000.0, max_position_embeddings=512)


def load_tokenizers(world: ToyWorld):
    """(student tokenizer, teacher tokenizer) via transformers.AutoTokenizer."""
    import transformers

    return (transformers.AutoTokenizer.from_pretrained(str(world.student_dir)),
            transformers.AutoTokenizer.from_pretrained(str(world.teacher_dir)))


def _encode(tok, texts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]


def _sft_data(items: Sequence[tasks.Task], tok, *, chat: bool, system_prompt: str):
    if chat:
        prompts = [data.teacher_prompt(t.problem, tok, system_prompt) for t in items]
    else:
        prompts = [data.student_prompt(t.problem, system_prompt) for t in items]
    responses = [ids + [tok.eos_token_id] for ids in _encode(tok, [t.solution for t in items])]
    return pretrain.encode_sft(_encode(tok, prompts), responses, tok.pad_token_id)


def _write_generation_config(directory: Path, tok, max_tokens: int = MAX_NEW_TOKENS) -> None:
    cfg = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
           "bos_token_id": None, "do_sample": True, "temperature": 1.0, "top_k": 0,
           "top_p": 1.0, "max_new_tokens": max_tokens}
    (directory / "generation_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _train_model(spec: ModelSpec, items, tok, *, chat: bool, config: BuildConfig,
                 seed: int, out_dir: Path, name: str, log_every: int,
                 phase1_dir: Path | None = None) -> dict:
    """SFT of `spec` on `items`, saved to out_dir. A PhasedModelSpec's second phase continues
    from the first; phase1_dir (a checkpoint of exactly phase 1, e.g. a saved earlier build)
    skips phase 1 and continues from it (float32 checkpoints round-trip exactly)."""
    tokens_nt, mask_nt = _sft_data(items, tok, chat=chat, system_prompt=config.system_prompt)
    mcfg = model_config(spec, len(tok))
    bucket = getattr(config, "length_bucket", 0)
    start = time.perf_counter()
    info: dict = {}
    if phase1_dir is None:
        params = qwen3.init_params(mcfg, jax.random.key(seed))
        params, losses = pretrain.train(params, mcfg, tokens_nt, mask_nt, spec.train, seed=seed,
                                        log_every=log_every, name=name, bucket=bucket)
        if getattr(spec, "finetune", None) is not None:
            info["phase1_final_loss"] = float(np.mean(losses[-50:]))
    else:
        loaded = checkpoint.from_pretrained(phase1_dir)
        if loaded.config != mcfg:
            raise ValueError(f"{phase1_dir}: config {loaded.config} is not {mcfg}")
        params = loaded.params
        info["phase1_from"] = "checkpoint"
    finetune = getattr(spec, "finetune", None)
    if finetune is not None:
        params, losses = pretrain.train(params, mcfg, tokens_nt, mask_nt, finetune,
                                        seed=seed + 100, log_every=log_every,
                                        name=f"{name} phase 2", bucket=bucket)
    seconds = time.perf_counter() - start
    checkpoint.save_pretrained(qwen3.Qwen3CausalLM(params=params, config=mcfg), out_dir)
    _write_generation_config(out_dir, tok, max_new_tokens(config))
    return {"train_seconds": round(seconds, 1), "final_loss": float(np.mean(losses[-50:])),
            "num_params": qwen3.num_params(mcfg), **info}


def build(out: str | os.PathLike, config: BuildConfig = DEFAULT_BUILD, *,
          parts: Sequence[str] = ("data", "teacher", "student"), log_every: int = 100,
          teacher_phase1: str | os.PathLike | None = None) -> ToyWorld:
    """Writes the world into `out` (see the module docstring) and returns its paths.

    `parts` rebuilds a subset (each part depends only on the config, so a partial rebuild gives
    the same files as a full one).
    """
    world = world_paths(out)
    world.root.mkdir(parents=True, exist_ok=True)
    tokenizer.save_tokenizers(world.student_dir, world.teacher_dir)
    tok_s, tok_t = load_tokenizers(world)
    train_tasks, test_tasks = tasks.make_splits(config.task, config.n_train, config.n_test,
                                                config.seed)
    info: dict = {"config": config.to_json()}
    if "data" in parts:
        tasks.write_jsonl(train_tasks, world.train_jsonl)
        tasks.write_jsonl(test_tasks, world.test_jsonl)
    if "teacher" in parts:
        teacher_tasks = train_tasks
        if getattr(config, "n_teacher_train", None):
            # The hard world's teacher corpus: its own draw (seed + 2), disjoint from the test.
            teacher_tasks = tasks.generate(config.task, config.n_teacher_train, config.seed + 2,
                                           "train", exclude=(t.problem for t in test_tasks))
        info["teacher"] = _train_model(config.teacher, teacher_tasks, tok_t, chat=True,
                                       config=config, seed=config.seed, out_dir=world.teacher_dir,
                                       name="teacher", log_every=log_every,
                                       phase1_dir=None if teacher_phase1 is None
                                       else Path(teacher_phase1))
    if "student" in parts:
        noisy = dataclasses.replace(config.task, noise=config.student_noise)
        # The student's corpus: its own draw of the train stream (same seed, disjoint from the
        # test split), with noisy worked solutions.
        student_tasks = tasks.generate(noisy, getattr(config, "n_student_train", config.n_train),
                                       config.seed + 1, "train",
                                       exclude=(t.problem for t in test_tasks))
        info["student"] = _train_model(config.student, student_tasks, tok_s, chat=False,
                                       config=config, seed=config.seed + 1,
                                       out_dir=world.student_dir, name="student",
                                       log_every=log_every)
    _update_info(world, info)
    return world


def _update_info(world: ToyWorld, info: dict) -> None:
    path = world.root / "build.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update(info)
    path.write_text(json.dumps(old, indent=2) + "\n")


def ensure_toy_world(cache_dir: str | os.PathLike | None = None,
                     config: BuildConfig | None = None, *, world: str = "default") -> ToyWorld:
    """The shipped world (`ASSETS_DIR`, or `HARD_ASSETS_DIR` for world="hard") if complete and
    the world's own config is asked for, else `cache_dir`'s, else builds it there.

    config defaults to the world's (`DEFAULT_BUILD` / `HARD_BUILD`). cache_dir defaults to
    $TRB_TOY_CACHE or ~/.cache/trb_jax/toy (toy_hard for the hard world).
    """
    world_cfg, shipped = world_config(world)
    config = world_cfg if config is None else config
    for cfg, directory in WORLDS.values():
        if config == cfg and is_complete(directory):
            return world_paths(directory)
    if cache_dir is None:
        cache_dir = os.environ.get("TRB_TOY_CACHE", "~/.cache/trb_jax/toy")
        cache_dir = cache_dir if world == "default" else os.path.join(cache_dir, world)
    cache = Path(cache_dir).expanduser()
    if is_complete(cache):
        return world_paths(cache)
    return build(cache, config)


# ---------------------------------------------------------------------------------------------
# Evaluation: pass@1 with temperature-1 sampling, as OPD rollouts and the paper's eval sample.


def sample_responses(model_dir: str | os.PathLike, prompts: Sequence[str], *, seed: int = 0,
                     max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 256,
                     temperature: float = 1.0, with_lengths: bool = False):
    """One sampled response per prompt string from the checkpoint in `model_dir` (with
    with_lengths: (responses, their lengths in tokens, EOS excluded)).

    Uses `trb_jax.rollout.rollout` with behavior "student" (the model alone, its own EOS),
    per-row keys fold_in(key(seed), row).
    """
    import transformers

    from trb_jax.blending import EosMap
    from trb_jax.rollout import (Prompts, RolloutSpec, make_knobs, pad_prompts, rollout,
                                 row_keys)

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = checkpoint.from_pretrained(model_dir)
    eos = tok.eos_token_id
    spec = RolloutSpec(behavior="student", max_new_tokens=max_new_tokens,
                       eos=EosMap.from_ids([eos], [eos]), student_eos_id=eos, teacher_eos_id=eos)
    knobs = make_knobs(temperature=temperature)
    ids = _encode(tok, prompts)
    out: list[str] = []
    lengths: list[int] = []
    for lo in range(0, len(ids), batch_size):
        chunk = ids[lo:lo + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
        p_ids, p_mask = pad_prompts(chunk, pad_id=tok.pad_token_id)
        res = rollout(model.params, None, Prompts(p_ids, p_mask),
                      row_keys(jax.random.key(seed), np.arange(lo, lo + batch_size)), knobs,
                      student_config=model.config, teacher_config=None, spec=spec)
        tokens, mask = np.asarray(res.tokens_bt), np.asarray(res.response_mask_bt)
        for i in range(min(batch_size, len(ids) - lo)):
            row = [int(t) for t, m in zip(tokens[i], mask[i]) if m and t != eos]
            out.append(tok.decode(row, skip_special_tokens=True))
            lengths.append(len(row))
    return (out, lengths) if with_lengths else out


def pass_at_1(responses: Sequence[str], answers: Sequence[str]) -> float:
    from trb_jax.rewards import grade

    return float(np.mean([grade(r, a) for r, a in zip(responses, answers)]))


def step_prefix_stats(responses: Sequence[str], solutions: Sequence[str],
                      answers: Sequence[str], ks: Sequence[int] = (1, 2, 3)) -> dict:
    """The "doom" measurement of a chain world: success rate conditioned on the response's first
    k step lines ("(j) ..." lines, `tasks.solution_steps`) being exactly the true solution's
    first k, vs not. Also the distribution of the first wrong step (1-based; 0 = none wrong)."""
    from trb_jax.rewards import grade

    ok = np.array([grade(r, a) for r, a in zip(responses, answers)], np.float64)
    first_wrong = []
    for r, sol in zip(responses, solutions):
        got, want = tasks.solution_steps(r), tasks.solution_steps(sol)
        j = next((i for i, w in enumerate(want) if i >= len(got) or got[i] != w), None)
        first_wrong.append(0 if j is None else j + 1)
    first_wrong = np.array(first_wrong)
    out = {"first_wrong_step_hist": {str(int(v)): int(c) for v, c in
                                     zip(*np.unique(first_wrong, return_counts=True))}}
    for k in ks:
        right = (first_wrong == 0) | (first_wrong > k)
        out[f"k{k}"] = {
            "n_prefix_right": int(right.sum()), "n_prefix_wrong": int((~right).sum()),
            "success_given_right": float(ok[right].mean()) if right.any() else None,
            "success_given_wrong": float(ok[~right].mean()) if (~right).any() else None}
    return out


def evaluate(world: ToyWorld, *, n_problems: int | None = None, n_samples: int = 2,
             seed: int = 0, system_prompt: str = tokenizer.SYSTEM_PROMPT,
             max_tokens: int = MAX_NEW_TOKENS, prefix_stats: bool = False) -> dict:
    """pass@1 (mean over n_samples temperature-1 samples per test problem) of both models, the
    mean response length in tokens (EOS excluded) and, with prefix_stats, each model's
    `step_prefix_stats` (the hard world's conditional-success measurement)."""
    records = tasks.read_jsonl(world.test_jsonl)[:n_problems]
    problems = [r["problem"] for r in records] * n_samples
    answers = [r["answer"] for r in records] * n_samples
    solutions = [r["solution"] for r in records] * n_samples
    _, tok_t = load_tokenizers(world)
    result = {"n_problems": len(records), "n_samples": n_samples, "max_new_tokens": max_tokens}
    for name, directory, prompts in (
        ("teacher", world.teacher_dir,
         [data.teacher_prompt(p, tok_t, system_prompt) for p in problems]),
        ("student", world.student_dir, [data.student_prompt(p, system_prompt) for p in problems]),
    ):
        start = time.perf_counter()
        responses, lengths = sample_responses(directory, prompts, seed=seed,
                                              max_new_tokens=max_tokens, with_lengths=True)
        result[f"{name}_pass@1"] = pass_at_1(responses, answers)
        result[f"{name}_eval_seconds"] = round(time.perf_counter() - start, 1)
        result[f"{name}_example"] = responses[0]
        if prefix_stats:
            result[f"{name}_mean_response_tokens"] = round(float(np.mean(lengths)), 1)
            result[f"{name}_prefix"] = step_prefix_stats(responses, solutions, answers)
    return result


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trb_jax.toy.build",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="default", choices=sorted(WORLDS),
                        help="which toy world (config and default --out)")
    parser.add_argument("--out", default=None,
                        help="world directory (default: the world's shipped directory)")
    parser.add_argument("--parts", default="data,teacher,student",
                        help="comma-separated subset of data,teacher,student to (re)build")
    parser.add_argument("--teacher-phase1", default=None,
                        help="a two-phase teacher: continue from this checkpoint of phase 1")
    parser.add_argument("--eval", action="store_true", help="measure pass@1 after building")
    parser.add_argument("--eval-only", action="store_true", help="only measure pass@1")
    parser.add_argument("--eval-problems", type=int, default=None)
    parser.add_argument("--eval-samples", type=int, default=2)
    args = parser.parse_args(argv)
    config, shipped = world_config(args.world)
    out = args.out or str(shipped)
    world = world_paths(out)
    if not args.eval_only:
        start = time.perf_counter()
        world = build(out, config, parts=tuple(args.parts.split(",")),
                      teacher_phase1=args.teacher_phase1)
        seconds = time.perf_counter() - start
        _update_info(world, {"build_seconds": round(seconds, 1)})
        print(f"built {world.root} in {seconds:.0f} s")
    if args.eval or args.eval_only:
        result = evaluate(world, n_problems=args.eval_problems, n_samples=args.eval_samples,
                          system_prompt=config.system_prompt, max_tokens=max_new_tokens(config),
                          prefix_stats=args.world != "default")
        _update_info(world, {"eval": result})
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The OPD training loop: prompts -> rollout (the method's behavior) -> grade -> train step.

`train(run_config, workdir)` is the whole job behind `python -m trb_jax.train`. Per update k:

  1. `methods.plan_step(k)` says the behavior, its knobs (eps_k, tau_k, ...) and the loss kind;
  2. the prompt stream yields `prompts_per_step` problems, each repeated `samples_per_prompt`
     times; the rollout samples one response per row with keys fold_in(fold_in(seed, k), row);
  3. responses are graded by math-verify in a process pool (a thread waits on it while the
     train step runs: rewards are logged, never trained on);
  4. the batch is [prompt | response]; if the rollout ran the teacher, its top-k teacher
     log-probs are reused (stored mode), otherwise the teacher scores the batch inside the step;
  5. metrics go to DIR/metrics.jsonl and TensorBoard; checkpoints (state + data position) to
     DIR/checkpoints every `checkpoint_every` updates and at the end; evaluation every
     `eval_every` updates (and at update 0 and the end) to DIR/eval.jsonl.

Everything random is a function of (seed, update index, row), and the data position is saved,
so a resumed run repeats an uninterrupted one bitwise on CPU.

Failures (docs/training.md, "Failures and recovery"): the workdir is locked for the run; the
data is read, checked and tokenized before any model loads; weights are checked finite after
loading; resume takes the newest checkpoint that restores (damaged newer ones are set aside);
a non-finite rollout, loss or gradient stops the run before anything of that update is logged
or checkpointed (or, with train.on_nonfinite = "skip", the update is skipped and counted).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trb_jax import checkpointing, distributed, evaluation, locking, methods, rewards, sharding
from trb_jax import data as data_lib
from trb_jax import train_step as ts
from trb_jax.behaviors import BLEND_BEHAVIORS, REPLACING_BEHAVIORS, make_knobs
from trb_jax.blending import EosMap
from trb_jax.config import RunConfig
from trb_jax.errors import CheckpointError, ConfigError, DataError, NonFiniteError, atomic_write
from trb_jax.metric_writer import MetricWriter
from trb_jax.models import checkpoint as hf_checkpoint
from trb_jax.models import qwen3
from trb_jax.rollout import PROMPT_BUCKETS, Prompts, Rollout, RolloutSpec, rollout, row_keys

__all__ = ["Models", "load_models", "make_mesh", "make_batch", "rollout_metrics", "train",
           "PREPARE"]


# ---------------------------------------------------------------------------------------------
# Models and tokenizers


@dataclasses.dataclass
class Models:
    """Both models, their tokenizers and the shared stop event (EosMap)."""

    params_s: Any
    config_s: qwen3.Qwen3Config
    params_t: Any
    config_t: qwen3.Qwen3Config
    tokenizer_s: Any
    tokenizer_t: Any
    eos: EosMap
    student_eos_id: int
    teacher_eos_id: int

    @property
    def pad_id_s(self) -> int:
        return _pad_id(self.tokenizer_s, self.student_eos_id)

    @property
    def pad_id_t(self) -> int:
        return _pad_id(self.tokenizer_t, self.teacher_eos_id)


def _pad_id(tokenizer, fallback: int) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback


def _eos_ids(tokenizer, directory: str, field: str) -> list[int]:
    """The tokenizer's EOS first, then any extra ids of generation_config.json (Qwen3 chat
    models stop on <|im_end|> and <|endoftext|>)."""
    import json

    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{field}: tokenizer has no eos_token")
    ids = [int(tokenizer.eos_token_id)]
    gen = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen):
        extra = json.load(open(gen)).get("eos_token_id")
        for i in [extra] if isinstance(extra, int) else (extra or []):
            if int(i) not in ids:
                ids.append(int(i))
    return ids


def _checkpoint_dir(path: str, field: str) -> str:
    """A local-looking path must exist (else the hub lookup would hide the real problem)."""
    expanded = os.path.expanduser(path)
    if path.startswith(("/", ".", "~")) or os.path.exists(expanded):
        if not os.path.isdir(expanded):
            what = "is not a directory" if os.path.exists(expanded) else "does not exist"
            raise CheckpointError(f"{field}: checkpoint directory {expanded} {what}")
    return path


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str):
    """AutoTokenizer.from_pretrained, once per path and process (a 151,936-token tokenizer
    takes about a second to load; sweeps and tests load the same ones for every run)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_tokenizers(model_cfg) -> tuple[Any, Any]:
    """(student, teacher) tokenizers; ConfigError if their vocabularies differ."""
    out = []
    for side in ("student", "teacher"):
        field = f"model.{side}_tokenizer" if getattr(model_cfg, f"{side}_tokenizer") \
            else f"model.{side}"
        path = _checkpoint_dir(getattr(model_cfg, f"{side}_tokenizer")
                               or getattr(model_cfg, side), field)
        try:
            out.append(_tokenizer(path))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{field}: cannot load a tokenizer from {path}: "
                                  f"{' '.join(str(e).split())[:300]}") from None
    tok_s, tok_t = out
    if tok_s.get_vocab() != tok_t.get_vocab():
        raise ConfigError("model.teacher_tokenizer: vocabulary mismatch: the student and teacher "
                          "tokenizers map tokens to different ids")
    return tok_s, tok_t


def _load_checkpoint(path: str, field: str, dtype: str, compute_dtype: str, mesh: Mesh | None,
                     rules) -> qwen3.Qwen3CausalLM:
    model = hf_checkpoint.from_pretrained(_checkpoint_dir(path, field), dtype=dtype,
                                          compute_dtype=compute_dtype, mesh=mesh, rules=rules)
    bad = checkpointing.nonfinite_paths(model.params)
    if bad:
        raise NonFiniteError(f"{field}: the checkpoint {path} has NaN/inf weights in "
                             f"{len(bad)} tensor(s), first {bad[0]}")
    return model


def load_models(model_cfg, tokenizers: tuple[Any, Any] | None = None, *,
                mesh: Mesh | None = None) -> Models:
    """Loads both checkpoints (checked finite) and tokenizers (`load_tokenizers` unless given);
    one-line errors for a missing directory or a vocabulary mismatch.

    The student in `param_dtype` (its trained master weights), the teacher in `teacher_dtype`,
    both computing in `compute_dtype`. With a mesh, each parameter is built shard by shard from
    safetensors slices, so each process reads only the bytes of its own shards: the student
    laid out by the training rules (as its TrainState), the frozen teacher by
    INFERENCE_AXIS_RULES ("embed" replicated: decoding never all-gathers it).
    """
    tok_s, tok_t = tokenizers or load_tokenizers(model_cfg)
    compute = model_cfg.student_compute_dtype
    s = _load_checkpoint(model_cfg.student, "model.student", model_cfg.param_dtype, compute, mesh,
                         sharding.LOGICAL_AXIS_RULES)
    t = _load_checkpoint(model_cfg.teacher, "model.teacher", model_cfg.teacher_param_dtype,
                         compute, mesh, sharding.INFERENCE_AXIS_RULES)
    s_config = dataclasses.replace(s.config, attention=model_cfg.attention)
    t_config = dataclasses.replace(t.config, attention=model_cfg.attention)
    if s.config.vocab_size != t.config.vocab_size:
        raise ConfigError(
            f"model.teacher: vocabulary mismatch: student vocab_size {s.config.vocab_size} vs "
            f"teacher vocab_size {t.config.vocab_size} (OPD needs a shared vocabulary)")
    student_eos = _eos_ids(tok_s, model_cfg.student, "model.student_tokenizer")
    teacher_eos = _eos_ids(tok_t, model_cfg.teacher, "model.teacher_tokenizer")
    eos = EosMap.from_ids(student_eos, teacher_eos)
    return Models(s.params, s_config, t.params, t_config, tok_s, tok_t, eos,
                  student_eos[0], teacher_eos[0])


# ---------------------------------------------------------------------------------------------
# Mesh and placement


def make_mesh(mesh_cfg) -> Mesh:
    n = jax.device_count()
    rest = mesh_cfg.fsdp * mesh_cfg.tensor
    data = n // rest if mesh_cfg.data == -1 else mesh_cfg.data
    if data < 1 or data * rest != n:
        raise ConfigError(f"mesh: data {mesh_cfg.data} x fsdp {mesh_cfg.fsdp} x tensor "
                          f"{mesh_cfg.tensor} does not match the {n} devices")
    return sharding.make_mesh(data, mesh_cfg.fsdp, mesh_cfg.tensor)


@functools.lru_cache(maxsize=8)
def _compute_cast(config: qwen3.Qwen3Config, mesh: Mesh):
    """jit: the student's params -> a copy in its compute dtype, placed like the teacher
    (INFERENCE_AXIS_RULES) for the rollout and evaluation: a decode step then reads bf16
    weights and never all-gathers them."""
    out = qwen3.param_shardings(config, mesh, rules=sharding.INFERENCE_AXIS_RULES)
    dtype = qwen3.DTYPES[config.compute_dtype]
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p), out_shardings=out)


def inference_student(params: Any, config: qwen3.Qwen3Config, mesh: Mesh):
    """(params, config) the rollout and evaluation decode with: the master weights themselves
    when they are already in the compute dtype, else a compute-dtype copy (one per update)."""
    if config.param_dtype == config.compute_dtype:
        return params, config
    return (_compute_cast(config, mesh)(params),
            config.with_dtype(config.compute_dtype, config.compute_dtype))


def check_rows_divide(rows: int, mesh_shape: dict[str, int], field: str) -> None:
    """ConfigError unless `rows` split evenly over the mesh axes the batch is sharded on (the
    sharding rules would otherwise replicate the batch on every device, silently)."""
    rule = dict(sharding.LOGICAL_AXIS_RULES)["batch"]
    axes = [a for a in ((rule,) if isinstance(rule, str) else rule) if a in mesh_shape]
    ways = int(np.prod([mesh_shape[a] for a in axes])) if axes else 1
    if rows % ways:
        raise ConfigError(f"{field}: {rows} rows per update do not split over the {ways} "
                          f"data-parallel devices (mesh {'x'.join(axes)}); use a multiple of "
                          f"{ways} or a smaller mesh.data")


def _rows_sharding(mesh: Mesh, rows: int) -> NamedSharding:
    spec = sharding.logical_to_spec(("batch",), (rows,), dict(mesh.shape))
    return NamedSharding(mesh, PartitionSpec(*spec, None))


# ---------------------------------------------------------------------------------------------
# One update's pieces


# Stored mode: the rollout field that carries each Batch field (train_step.STORED_FIELDS).
_ROLLOUT_FIELD = {
    "topk_ids_btk": "topk_ids_btk",
    "topk_teacher_logprob_btk": "topk_teacher_logprob_btk",
    "teacher_topk_ids_btk": "teacher_topk_ids_btk",
    "teacher_topk_logprob_btk": "teacher_topk_teacher_logprob_btk",
    "sampled_teacher_logprob_bt": "teacher_logprob_bt",
}


def make_batch(prompts: Prompts, ro: Rollout, plan: methods.StepPlan,
               config: ts.TrainConfig) -> ts.Batch:
    """[prompt | response] for the student, plus what the objective of `config` reads from the
    teacher: the rollout's stored scores if the teacher ran in the rollout, else the teacher's
    own sequence (the step runs its forward). Teacher-sampled prefix tokens are marked when
    the plan imitates them.

    The student sequence carries the student's native EOS at the stop, the teacher sequence the
    teacher's (what each model was fed during the rollout).
    """
    ids = jnp.concatenate([prompts.student_ids_bt, ro.student_tokens_bt], axis=1)
    mask = jnp.concatenate([prompts.student_mask_bt, jnp.ones_like(ro.student_tokens_bt)], axis=1)
    batch = ts.Batch(input_ids_bs=ids, attention_mask_bs=mask,
                     response_mask_bt=ro.response_mask_bt)
    if plan.imitate_prefix:
        batch = batch.replace(prefix_mask_bt=ro.from_teacher_bt)
    if config.objective_spec.needs_alpha:
        batch = batch.replace(target_alpha=jnp.asarray(plan.target_alpha, jnp.float32))
    if not ts.step_needs_teacher(config, batch):
        return batch
    if ro.topk_ids_btk is not None:  # the teacher ran inside the rollout: reuse its scores
        fields = [f for support in ts.step_supports(config, batch) for f in ts.STORED_FIELDS[support]]
        return batch.replace(**{f: getattr(ro, _ROLLOUT_FIELD[f]) for f in fields})
    t_ids = jnp.concatenate([prompts.teacher_ids_bt, ro.teacher_tokens_bt], axis=1)
    t_mask = jnp.concatenate([prompts.teacher_mask_bt, jnp.ones_like(ro.teacher_tokens_bt)], axis=1)
    return batch.replace(teacher_input_ids_bs=t_ids, teacher_attention_mask_bs=t_mask)


def _masked_mean(x_bt: np.ndarray, mask_bt: np.ndarray) -> float:
    n = mask_bt.sum()
    return float((np.where(mask_bt, x_bt, 0.0)).sum() / n) if n else float("nan")


def _row_means(x_bt: np.ndarray, mask_bt: np.ndarray) -> np.ndarray:
    return np.where(mask_bt, x_bt, 0.0).sum(-1) / np.maximum(mask_bt.sum(-1), 1)


def rollout_metrics(ro_host: dict[str, np.ndarray], plan: methods.StepPlan, rewards_b: np.ndarray,
                    step_metrics: dict[str, np.ndarray]) -> dict[str, float]:
    """The per-step diagnostics of the paper (docs/method.md, section 6) from host arrays."""
    mask = ro_host["response_mask_bt"].astype(bool)
    lengths = ro_host["lengths_b"]
    out: dict[str, float] = {
        "reward": float(np.mean(rewards_b)),
        "response_length": float(np.mean(lengths)),
        "eps": plan.eps, "tau": plan.tau, "target_alpha": plan.target_alpha,
        "warmup": float(plan.warmup),
    }
    if ro_host["topk_ids_btk"] is not None:  # the teacher ran in the rollout
        t_lp, s_lp = ro_host["teacher_logprob_bt"], ro_host["student_logprob_bt"]
        t_row, s_row = _row_means(t_lp, mask), _row_means(s_lp, mask)
        entropy = _masked_mean(ro_host["teacher_entropy_bt"], mask)
        teacher_lp = _masked_mean(t_lp, mask)
    else:  # the train step's teacher forward scored the sampled tokens
        t_row, s_row = step_metrics["teacher_logprob_b"], step_metrics["student_logprob_b"]
        w = lengths / max(lengths.sum(), 1)
        entropy = float(np.sum(step_metrics["teacher_entropy_b"] * w))
        teacher_lp = float(np.sum(t_row * w))
    out["teacher_logprob"] = teacher_lp
    out["student_logprob"] = _masked_mean(ro_host["student_logprob_bt"], mask)
    out["teacher_entropy"] = entropy
    score = np.asarray(t_row - s_row, np.float64)
    finite = np.isfinite(score)
    out["auroc"] = (rewards.auroc(score[finite], (rewards_b[finite] > 0.5).astype(int))
                    if finite.any() else float("nan"))
    beta = ro_host["beta_bt"][mask]
    beta = beta[np.isfinite(beta)]
    if plan.behavior in BLEND_BEHAVIORS and beta.size:  # a blended rollout solved for beta*
        out["beta_mean"] = float(beta.mean())
        for q in (10, 50, 90):
            out[f"beta_p{q}"] = float(np.percentile(beta, q))
    kl = ro_host["kl_bt"][mask]
    out["behavior_kl"] = float(np.nanmean(kl)) if np.isfinite(kl).any() else float("nan")
    # share of response tokens the teacher sampled (teacher prefixes, SKD replacements, SFT data)
    out["teacher_token_frac"] = _masked_mean(ro_host["from_teacher_bt"].astype(np.float32), mask)
    if plan.behavior in REPLACING_BEHAVIORS:
        out["skd_replaced_frac"] = _masked_mean(ro_host["skd_replaced_bt"].astype(np.float32), mask)
    return out


# ---------------------------------------------------------------------------------------------
# Preparation hooks (self-contained configs build their inputs under the workdir)


def _prepare_smoke(workdir: str) -> None:
    from trb_jax import smoke

    smoke.make_smoke_world(os.path.join(workdir, "smoke"))


def _prepare_toy(workdir: str) -> None:
    from trb_jax.toy import build

    build.ensure_toy_world()  # the shipped world (or the cached build); configs/toy.py paths


PREPARE = {"": lambda workdir: None, "smoke": _prepare_smoke, "toy": _prepare_toy}


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class _Run:
    cfg: RunConfig
    workdir: str
    models: Models
    mesh: Mesh
    stream: data_lib.PromptStream
    state: ts.TrainState
    params_t: Any
    rollout_key: jax.Array
    eval_key: jax.Array
    eval_sets: list
    grader: rewards.Grader | None  # started once setup has passed
    manager: Any
    skipped: int = 0  # updates skipped for a non-finite loss or gradient (on_nonfinite="skip")


def _last_checkpoint(run: _Run) -> str:
    step = checkpointing.latest_step(run.manager)
    return f" (newest checkpoint: {step})" if step is not None else " (no checkpoint yet)"


def phase_optim(cfg: RunConfig, phase: str) -> ts.OptimConfig:
    """The optimizer of a phase (methods.optimizer_phase): OPD's is `optim`; SFT warmup's is
    AdamW with the same moments and clipping at `method.sft_lr` (0: optim.peak_lr), linear
    warmup over optim.warmup_steps, then constant (so it does not depend on sft_steps)."""
    if phase == "opd":
        return cfg.optim
    return dataclasses.replace(cfg.optim, peak_lr=cfg.method.sft_lr or cfg.optim.peak_lr,
                               decay_steps=cfg.optim.warmup_steps + 1, end_lr_fraction=1.0)


def _train_config(cfg: RunConfig, models: Models, plan: methods.StepPlan) -> ts.TrainConfig:
    """The train step's settings for an update of `plan`: its phase's optimizer and its
    objective (the run's, or the one the method sets for this phase)."""
    objective = dataclasses.replace(cfg.objective, name=plan.objective_name(cfg.objective.name))
    return ts.TrainConfig(student=models.config_s, teacher=models.config_t,
                          optim=phase_optim(cfg, plan.phase), top_k=cfg.rollout.top_k,
                          chunk_size=cfg.train.chunk_size, eos=models.eos,
                          remat_layers=cfg.model.remat_layers, objective=objective,
                          microbatch_rows=cfg.train.microbatch_rows)


def _rollout_spec(cfg: RunConfig, models: Models, behavior: str) -> RolloutSpec:
    return RolloutSpec(behavior=behavior, max_new_tokens=cfg.rollout.max_new_tokens,
                       eos=models.eos, student_eos_id=models.student_eos_id,
                       teacher_eos_id=models.teacher_eos_id, top_k=cfg.rollout.top_k,
                       solver=cfg.rollout.solver)


# The plan whose train config initialises and restores the state (the OPD phase's optimizer;
# both phases' AdamW states have one structure).
_OPD_PLAN = methods.StepPlan(behavior="student")


def _needs_teacher_forward(config: ts.TrainConfig, batch: ts.Batch) -> bool:
    return ts.step_needs_teacher(config, batch) and not batch.uses_stored_teacher


@functools.lru_cache(maxsize=32)
def _jitted_step(config: ts.TrainConfig, mesh: Mesh, needs_teacher: bool, batch_struct):
    """One jitted step per (config, mesh, mode, batch structure), shared by every run in this
    process (tests and sweeps run many short jobs; each would otherwise recompile)."""
    state_sh = ts.state_shardings(config, mesh, _abstract_state(config))
    params_t = jax.eval_shape(lambda: qwen3.init_params(config.teacher, jax.random.key(0)))
    teacher_sh = ts.teacher_shardings(config, mesh, params_t) if needs_teacher else None
    batch = jax.tree.unflatten(batch_struct[0], [jax.ShapeDtypeStruct(s, d)
                                                 for s, d in batch_struct[1]])
    return ts.jit_train_step(config, mesh=mesh, state_sharding=state_sh,
                             batch_sharding=ts.batch_shardings(mesh, batch),
                             teacher_sharding=teacher_sh)


def _abstract_state(config: ts.TrainConfig) -> ts.TrainState:
    def init():
        params = qwen3.init_params(config.student, jax.random.key(0))
        return ts.init_train_state(params, config, jax.random.key(0))
    return jax.eval_shape(init)


def _step_fn(config: ts.TrainConfig, run: _Run, batch: ts.Batch):
    leaves, treedef = jax.tree.flatten(batch)
    struct = (treedef, tuple((x.shape, x.dtype) for x in leaves))
    return _jitted_step(config, run.mesh, _needs_teacher_forward(config, batch), struct)


def _examples_to_prompts(run: _Run, examples) -> tuple[Prompts, list]:
    """All rows (every process walks the same stream) -> global prompt arrays built from each
    process's own block of rows (`distributed.process_row_slice`)."""
    n = run.cfg.rollout.samples_per_prompt
    rows = [e for e in examples for _ in range(n)]
    width = run.cfg.rollout.prompt_length
    buckets = (width,) if width else PROMPT_BUCKETS
    local = rows[distributed.process_row_slice(len(rows))]
    prompts = data_lib.to_prompts(local, run.models.pad_id_s, run.models.pad_id_t, buckets)
    rows_sh = _rows_sharding(run.mesh, len(rows))
    prompts = distributed.global_batch_from_local(prompts, jax.tree.map(lambda _: rows_sh, prompts))
    return prompts, rows


def _placer(mesh: Mesh):
    """Host arrays identical on every process -> rows split over the mesh's batch axes."""
    def place(tree):
        return jax.tree.map(lambda x: jax.device_put(x, _rows_sharding(mesh, x.shape[0])), tree)
    return place


def _fetch_tree(tree):
    return jax.tree.map(distributed.fetch, tree)


def _records(run: _Run, rows) -> str:
    where = sorted({run.stream.where[e.index] for e in rows}) if run.stream.where else []
    more = f" and {len(where) - 3} more" if len(where) > 3 else ""
    return "; ".join(where[:3]) + more


def check_rollout_finite(ro_host: dict[str, np.ndarray]) -> str | None:
    """None, or what is wrong: NaN or +inf log-probs of sampled tokens (a -inf is legitimate:
    a token the student's top-p excluded). NaN/+inf logits make every log-softmax NaN.

    Checked on the host, on arrays the trainer fetches anyway: no host callback or checkify
    branch in the jitted decode loop, no extra device work or transfer.
    """
    mask = ro_host["response_mask_bt"].astype(bool)
    for name, whose in (("student_logprob_bt", "student"), ("behavior_logprob_bt", "behavior")):
        x = ro_host[name]
        bad = mask & (np.isnan(x) | (x == np.inf))
        if bad.any():
            return (f"the {whose} log-probs of {int(bad.sum())} of {int(mask.sum())} sampled "
                    f"tokens are NaN/+inf (first in row {int(np.argwhere(bad)[0][0])}): the "
                    "models' logits are not finite")
    return None


def _one_update(run: _Run, k: int, pool: concurrent.futures.ThreadPoolExecutor) -> dict:
    cfg, models = run.cfg, run.models
    plan = methods.plan_step(k, cfg.method)
    phase, phase_step = methods.optimizer_phase(k, cfg.method)
    if phase_step == 0 and k > 0:  # a new phase: fresh optimizer state, its schedule from 0
        run.state = _fresh_optimizer(run, plan)
    t0 = time.perf_counter()
    prompts, rows = _examples_to_prompts(run, next(run.stream))
    knobs = make_knobs(eps=plan.eps, tau=plan.tau, skd_k=plan.skd_k, skd_tau_t=plan.skd_tau_t,
                       temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                       prefix_tokens=plan.prefix_tokens)
    keys = row_keys(jax.random.fold_in(run.rollout_key, k), np.arange(len(rows)))
    spec = _rollout_spec(cfg, models, plan.behavior)
    params_s, config_s = inference_student(run.state.params, models.config_s, run.mesh)
    with jax.set_mesh(run.mesh):
        ro = rollout(params_s, run.params_t, prompts, keys, knobs,
                     student_config=config_s, teacher_config=models.config_t, spec=spec)
    del params_s
    ro_host = _fetch_tree({f.name: getattr(ro, f.name) for f in dataclasses.fields(ro)})
    t1 = time.perf_counter()
    problem = check_rollout_finite(ro_host)
    if problem is not None:
        raise NonFiniteError(f"update {k}: rollout: {problem} (diverged weights or a NaN "
                             f"checkpoint; prompts from {_records(run, rows)}); nothing of this "
                             f"update was logged or checkpointed{_last_checkpoint(run)}")

    texts = evaluation.decode_responses(models.tokenizer_s, ro_host["tokens_bt"],
                                        ro_host["lengths_b"], models.eos.stop_id)
    answers = [e.answer for e in rows]
    graded = pool.submit(run.grader.grade_batch, texts, answers, cfg.train.grader_timeout_s)

    train_config = _train_config(cfg, models, plan)
    batch = make_batch(prompts, ro, plan, train_config)
    step = _step_fn(train_config, run, batch)
    t2 = time.perf_counter()
    teacher = run.params_t if _needs_teacher_forward(train_config, batch) else None
    run.state, step_metrics = step(run.state, batch, teacher)
    step_metrics = _fetch_tree(step_metrics)
    t3 = time.perf_counter()
    rewards_b = np.asarray(graded.result(), np.float64)
    t4 = time.perf_counter()

    metrics = {key: float(v) for key, v in step_metrics.items() if np.ndim(v) == 0}
    # The step kept the old state if either is non-finite (train_step.train_step).
    if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
        if cfg.train.on_nonfinite == "raise":
            raise NonFiniteError(
                f"update {k}: loss {metrics['loss']}, grad_norm {metrics['grad_norm']} "
                f"(prompts from {_records(run, rows)}); the run diverged or its weights hold "
                f"NaN; nothing of this update was logged or checkpointed"
                f"{_last_checkpoint(run)}; lower optim.peak_lr, or set "
                "train.on_nonfinite=skip to skip such updates")
        run.skipped += 1
    metrics["skipped_updates"] = float(run.skipped)
    metrics.update(rollout_metrics(ro_host, plan, rewards_b, step_metrics))
    tokens = float(ro_host["lengths_b"].sum())
    metrics.update({
        "behavior": plan.behavior, "objective": train_config.objective.name,
        "time_rollout_s": t1 - t0, "time_update_s": t3 - t2,
        # grading overlaps the update; this is the wait left after the update finished
        "time_scoring_s": (t2 - t1) + (t4 - t3),
        "tokens_per_s": tokens / (t4 - t0), "rollout_tokens_per_s": tokens / (t1 - t0),
    })
    return metrics


def _fresh_optimizer(run: _Run, plan: methods.StepPlan) -> ts.TrainState:
    config = _train_config(run.cfg, run.models, plan)
    tx, _ = ts.make_optimizer(config.optim)
    shardings = ts.state_shardings(config, run.mesh, run.state)

    def fresh(state):
        return state.replace(opt_state=tx.init(state.params), step=jnp.zeros((), jnp.int32))

    return jax.jit(fresh, out_shardings=shardings, donate_argnums=0)(run.state)


def _save_sft_checkpoint(run: _Run, done: int) -> None:
    """The student after `done` SFT updates as a Hugging Face checkpoint (WORKDIR/sft/step_N)."""
    params = jax.tree.map(distributed.fetch, run.state.params)
    if distributed.is_primary():
        model = qwen3.Qwen3CausalLM(params=params, config=run.models.config_s)
        hf_checkpoint.save_pretrained(model, os.path.join(run.workdir, "sft", f"step_{done}"))


def _evaluate(run: _Run, updates: int) -> dict[str, float]:
    out = {}
    ev, models = run.cfg.eval, run.models
    params_s, config_s = inference_student(run.state.params, models.config_s, run.mesh)
    for ds, (problems, answers) in run.eval_sets:
        with jax.set_mesh(run.mesh):
            res = evaluation.evaluate_dataset(
                ds.name, problems, answers, params=params_s, config=config_s,
                tokenizer=models.tokenizer_s, eos=models.eos, student_eos_id=models.student_eos_id,
                grader=run.grader, rng=jax.random.fold_in(run.eval_key, updates),
                num_samples=ev.num_samples, max_new_tokens=ev.max_new_tokens, ks=ev.ks,
                temperature=ev.temperature, top_p=ev.top_p, batch_size=ev.batch_size,
                system_prompt=run.cfg.data.system_prompt,
                grade_timeout_s=run.cfg.train.grader_timeout_s, place=_placer(run.mesh))
        out.update({f"{ds.name}/{key}": v for key, v in res.metrics.items()})
    return out


def _report_data(stream: data_lib.PromptStream, workdir: str, primary: bool) -> None:
    report = stream.report or {}
    affected = report.get("dropped") or report.get("truncated")
    if not (primary and affected):
        return
    verb = "dropped" if report.get("dropped") else "truncated"
    print(f"data: {verb} {len(affected)} of {report['records']} prompts longer than "
          f"{report['max_length']} tokens (data.overlong={report['overlong']!r}), first "
          f"{affected[0]}; list in {workdir}/data_report.json", file=sys.stderr)
    atomic_write(os.path.join(workdir, "data_report.json"), json.dumps(report, indent=1) + "\n")


def _validate_checkpoint(state: ts.TrainState, extra: dict[str, Any]) -> None:
    missing = [key for key in ("updates", "stream") if key not in extra]
    if missing:
        raise CheckpointError(f"its metadata lacks {missing}")
    bad = checkpointing.nonfinite_paths(state)
    if bad:
        raise NonFiniteError(f"NaN/inf values in {len(bad)} array(s), first {bad[0]}")


def _restore(manager, workdir: str, abstract_sh, primary: bool, max_to_keep: int):
    """(manager, state, extra) of the newest checkpoint that restores; newer damaged ones are
    moved to WORKDIR/checkpoints_damaged (never deleted) and named on stderr."""
    directory = os.path.join(workdir, "checkpoints")
    step, state, extra, skipped = checkpointing.restore_newest_good(manager, abstract_sh,
                                                                    _validate_checkpoint)
    if step is None:
        detail = "; ".join(f"checkpoint {s}: {why}" for s, why in skipped)
        raise CheckpointError(f"no checkpoint in {directory} restores ({detail}); move the "
                              "directory away to start over")
    if skipped:
        manager.close()
        for bad_step, why in skipped:
            moved = (checkpointing.set_aside(directory, bad_step,
                                             os.path.join(workdir, "checkpoints_damaged"))
                     if primary else "checkpoints_damaged/")
            print(f"resume: skipped checkpoint {bad_step} ({why}); moved to {moved}",
                  file=sys.stderr)
        print(f"resume: resuming from checkpoint {step}", file=sys.stderr)
        manager = checkpointing.make_manager(directory, save_interval_steps=1,
                                             max_to_keep=max_to_keep)
    return manager, state, extra


def _setup(cfg: RunConfig, workdir: str) -> tuple[_Run, int]:
    """Everything before the first update, cheapest checks first: tokenizers, mesh, all the
    data (parsed, tokenized, over-long prompts handled), eval data, then the weights."""
    primary = distributed.is_primary()
    PREPARE[cfg.prepare](workdir)
    tokenizers = load_tokenizers(cfg.model)
    mesh = make_mesh(cfg.mesh)
    check_rows_divide(cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt,
                      dict(mesh.shape), "rollout.prompts_per_step x rollout.samples_per_prompt")
    if cfg.train.microbatch_rows:  # each micro-batch is split over the same devices
        check_rows_divide(cfg.train.microbatch_rows, dict(mesh.shape), "train.microbatch_rows")
    if jax.process_count() > 1 and not cfg.rollout.prompt_length:
        raise ConfigError("rollout.prompt_length: multi-process runs need a fixed prompt width "
                          "(every process pads its own rows to the same shape)")
    width = cfg.rollout.prompt_length
    stream = data_lib.make_stream(
        cfg.data, *tokenizers, batch_size=cfg.rollout.prompts_per_step,
        max_length=width or max(PROMPT_BUCKETS),
        length_field="rollout.prompt_length" if width else "the largest of rollout.PROMPT_BUCKETS")
    _report_data(stream, workdir, primary)
    eval_sets = [(ds, evaluation.load_eval_problems(ds)) for ds in cfg.eval.datasets]

    models = load_models(cfg.model, tokenizers, mesh=mesh)
    train_cfg = _train_config(cfg, models, _OPD_PLAN)
    root = jax.random.key(cfg.train.seed)
    init_key, rollout_key, eval_key = jax.random.split(root, 3)

    init = functools.partial(ts.init_train_state, config=train_cfg, rng=init_key)
    abstract = jax.eval_shape(init, models.params_s)
    state_sh = ts.state_shardings(train_cfg, mesh, abstract)
    params_s = jax.device_put(models.params_s, state_sh.params)  # loaded so: no copy
    params_t = jax.device_put(models.params_t,
                              ts.teacher_shardings(train_cfg, mesh, models.params_t))  # idem
    models = dataclasses.replace(models, params_s=None, params_t=None)  # one copy: in the state

    manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"),
                                         save_interval_steps=1,
                                         max_to_keep=cfg.train.max_checkpoints)
    skipped = 0
    if not checkpointing.all_steps(manager):
        state = jax.jit(init, out_shardings=state_sh)(params_s)
        start = 0
    else:
        abstract_sh = checkpointing.abstract_target(abstract, state_sh)
        manager, state, extra = _restore(manager, workdir, abstract_sh, primary,
                                         cfg.train.max_checkpoints)
        try:
            stream.load_state_dict(extra["stream"])
        except ValueError as e:
            raise DataError(f"data.source: {e} (the data or data.overlong changed since the "
                            "checkpoint was written)") from None
        start = int(extra["updates"])
        skipped = int(extra.get("skipped_updates", 0))
    del params_s
    run = _Run(cfg=cfg, workdir=workdir, models=models, mesh=mesh, stream=stream,
               state=state, params_t=params_t, rollout_key=rollout_key, eval_key=eval_key,
               eval_sets=eval_sets, grader=None, manager=manager, skipped=skipped)
    return run, start


def _save(run: _Run, updates: int) -> None:
    checkpointing.save(run.manager, updates, run.state,
                       {"updates": updates, "stream": run.stream.state_dict(),
                        "skipped_updates": run.skipped})


def train(cfg: RunConfig, workdir: str, *, config_json: str | None = None
          ) -> list[dict[str, Any]]:
    """Runs (or resumes) the job in `workdir`; returns the records logged by this call.

    The primary process holds the workdir lock (`locking.WorkdirLock`) for the whole call;
    `config_json` (the ConfigDict as JSON) is written to WORKDIR/config.json once setup passed.
    """
    fresh = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    total = methods.total_updates(cfg.method, cfg.train.num_steps)
    primary = distributed.is_primary()
    lock = locking.WorkdirLock(workdir) if primary else contextlib.nullcontext()
    with lock:
        try:
            run, start = _setup(cfg, workdir)  # every check that can fail, before any process
        except BaseException:
            if fresh and primary:
                _remove_if_only_lock(workdir)
            raise
        if config_json is not None and primary:
            atomic_write(os.path.join(workdir, "config.json"), config_json)
        with rewards.Grader(cfg.train.grader_workers) as grader, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            run.grader = grader
            try:
                return _loop(run, start, total, pool, primary)
            finally:
                run.manager.close()


def _remove_if_only_lock(workdir: str) -> None:
    """A run that failed before its first output leaves no directory behind (just its lock)."""
    try:
        if os.listdir(workdir) == [locking.LOCK_FILE]:
            os.remove(os.path.join(workdir, locking.LOCK_FILE))
            os.rmdir(workdir)
    except OSError:  # another trainer raced in: its files stay, and so does the error we report
        pass


def _eval_due(cfg: RunConfig, done: int, total: int) -> bool:
    if not cfg.eval.datasets:
        return False
    return done == 0 or done == total or bool(cfg.train.eval_every
                                              and done % cfg.train.eval_every == 0)


def _checkpoint_due(cfg: RunConfig, done: int, total: int) -> bool:
    return done == total or bool(cfg.train.checkpoint_every
                                 and done % cfg.train.checkpoint_every == 0)


# Crash-safety testing: SIGKILL this process right after update N is logged (before any
# checkpoint of it), as a preempted or OOM-killed job would die. Never set in normal runs.
FAULT_ENV = "TRB_FAULT_KILL_AFTER_UPDATE"


def _maybe_inject_crash(k: int) -> None:
    if os.environ.get(FAULT_ENV) == str(k):
        os.kill(os.getpid(), 9)


def _loop(run: _Run, start: int, total: int, pool, primary: bool) -> list[dict[str, Any]]:
    """Updates start..total-1. Every process computes; only the primary writes logs."""
    cfg = run.cfg
    resume = start if start > 0 else None
    writer = eval_writer = bar = None
    if primary:
        writer = MetricWriter(run.workdir, "metrics", resume_step=resume)
        if cfg.eval.datasets:
            # eval at step s is of the state after s updates, written before checkpoint s
            eval_writer = MetricWriter(run.workdir, "eval",
                                       resume_step=None if resume is None else resume + 1)
        if cfg.train.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start, desc="train", unit="update",
                       dynamic_ncols=True)
    logged = []
    try:
        if start == 0 and _eval_due(cfg, 0, total):
            results = _evaluate(run, 0)
            if eval_writer is not None:
                eval_writer.write(0, results)
        for k in range(start, total):
            metrics = _one_update(run, k, pool)
            done = k + 1
            if writer is not None and (k % cfg.train.log_every == 0 or done == total):
                logged.append(writer.write(k, metrics))
            _maybe_inject_crash(k)
            # the student after `done` updates of the SFT phase, at the requested counts
            if methods.plan_step(k, cfg.method).phase == "sft" and done in cfg.method.sft_checkpoints:
                _save_sft_checkpoint(run, done)
            if _eval_due(cfg, done, total):
                results = _evaluate(run, done)
                if eval_writer is not None:
                    eval_writer.write(done, results)
            if _checkpoint_due(cfg, done, total):
                _save(run, done)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", reward=f"{metrics['reward']:.2f}")
                bar.update(1)
        checkpointing.wait(run.manager)
    finally:
        for closable in (bar, writer, eval_writer):
            if closable is not None:
                closable.close()
    return logged


def evaluate_run(cfg: RunConfig, workdir: str, *, step: int | None = None,
                 student: str | None = None, seed: int = 0) -> tuple[dict[str, Any], str]:
    """Evaluates a run's checkpoint (latest or `step`) or the HF checkpoint `student`.

    Returns ({"datasets": {name: {"metrics", "correct_pn"}}, "source": ...}, tag).
    """
    PREPARE[cfg.prepare](workdir)
    model_cfg = cfg.model if student is None else dataclasses.replace(
        cfg.model, student=student, student_tokenizer=cfg.model.student_tokenizer or student)
    mesh = make_mesh(cfg.mesh)
    models = load_models(model_cfg, mesh=mesh)
    if student is None:
        train_cfg = _train_config(cfg, models, _OPD_PLAN)
        init = functools.partial(ts.init_train_state, config=train_cfg, rng=jax.random.key(0))
        abstract = jax.eval_shape(init, models.params_s)
        manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"))
        try:
            step = checkpointing.latest_step(manager) if step is None else step
            if step is None:
                raise CheckpointError(f"no checkpoint in {workdir}/checkpoints")
            if step not in checkpointing.all_steps(manager):
                raise CheckpointError(f"no checkpoint {step} in {workdir}/checkpoints (have "
                                      f"{checkpointing.all_steps(manager)})")
            try:
                state, _ = checkpointing.restore(manager, step, checkpointing.abstract_target(
                    abstract, ts.state_shardings(train_cfg, mesh, abstract)))
            except Exception as e:  # noqa: BLE001  (a damaged checkpoint fails in many ways)
                raise CheckpointError(f"{workdir}/checkpoints/{step} cannot be restored: "
                                      f"{checkpointing.reason(e)}") from None
        finally:
            manager.close()
        bad = checkpointing.nonfinite_paths(state.params)
        if bad:
            raise NonFiniteError(f"{workdir}/checkpoints/{step} has NaN/inf weights in "
                                 f"{len(bad)} tensor(s), first {bad[0]}")
        params, tag, source = state.params, f"step_{step}", f"{workdir}/checkpoints/{step}"
    else:
        params, tag = models.params_s, os.path.basename(os.path.normpath(student))
        source = student
    params, config_s = inference_student(params, models.config_s, mesh)
    ev = cfg.eval
    out: dict[str, Any] = {"source": source, "num_samples": ev.num_samples, "datasets": {}}
    with rewards.Grader(cfg.train.grader_workers) as grader, jax.set_mesh(mesh):
        for ds in cfg.eval.datasets:
            problems, answers = evaluation.load_eval_problems(ds)
            res = evaluation.evaluate_dataset(
                ds.name, problems, answers, params=params, config=config_s,
                tokenizer=models.tokenizer_s, eos=models.eos,
                student_eos_id=models.student_eos_id, grader=grader,
                rng=jax.random.key(seed), num_samples=ev.num_samples,
                max_new_tokens=ev.max_new_tokens, ks=ev.ks, temperature=ev.temperature,
                top_p=ev.top_p, batch_size=ev.batch_size, system_prompt=cfg.data.system_prompt,
                grade_timeout_s=cfg.train.grader_timeout_s, place=_placer(mesh))
            out["datasets"][ds.name] = {"metrics": res.metrics,
                                        "correct_pn": res.correct_pn.astype(int).tolist()}
    return out, tag


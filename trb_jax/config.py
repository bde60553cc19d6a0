"""Run configuration: the ml_collections ConfigDict of `configs/*.py` -> frozen dataclasses.

`base_config()` is the ConfigDict every config file starts from (every field, with defaults).
`to_run_config(cd, workdir=...)` checks it (unknown or ill-typed fields, bad values: one-line
`ConfigError`s naming the dotted field) and converts it into `RunConfig`, the typed view the
trainer and evaluator read. Paths may contain "{workdir}", replaced by the run's directory
(self-contained configs such as configs/smoke.py build their models there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from trb_jax import config_files
from trb_jax import data as data_lib
from trb_jax import objectives
from trb_jax.config_files import load_config_file  # re-exported: config.load_config_file
from trb_jax.errors import ConfigError
from trb_jax.methods import MethodConfig
from trb_jax.models import attention as attention_lib
from trb_jax.optim import OptimConfig

__all__ = [
    "ConfigError",
    "ModelConfig",
    "RolloutConfig",
    "TrainLoopConfig",
    "EvalDataset",
    "EvalConfig",
    "MeshConfig",
    "RunConfig",
    "base_config",
    "to_run_config",
    "load_config_file",
    "repo_config_path",
]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """student / teacher: Hugging Face checkpoint dirs (or hub ids) in safetensors format.

    *_tokenizer: where each tokenizer is ("" = the checkpoint dir). remat_layers: checkpoint
    each student layer in the train step.

    Dtype policy ("float32" or "bfloat16"; "" = param_dtype):
      param_dtype    the student's trained weights and its AdamW moments (float32 master copy).
      compute_dtype  activations and matmul inputs of both models: weights are cast to it at
                     use inside the jitted programs; the rollout and evaluation read a copy of
                     the student in this dtype. Logits are float32 either way.
      teacher_dtype  the frozen teacher's stored weights.
      allow_bf16_adamw  param_dtype "bfloat16" is refused unless this is True: AdamW on
                     bfloat16 weights drops every update below the bf16 spacing (at lr 1e-6
                     about 98% of the weights of a fresh model never move).
    attention: the attention implementation of both models (`Qwen3Config.attention`): "auto"
    (the best for the backend), "xla" (reference), "blockwise", "cudnn" (GPU) or "splash" (TPU).
    """

    student: str = ""
    teacher: str = ""
    student_tokenizer: str = ""
    teacher_tokenizer: str = ""
    param_dtype: str = "float32"
    compute_dtype: str = ""
    teacher_dtype: str = ""
    allow_bf16_adamw: bool = False
    remat_layers: bool = False
    attention: str = "auto"

    @property
    def student_compute_dtype(self) -> str:
        return self.compute_dtype or self.param_dtype

    @property
    def teacher_param_dtype(self) -> str:
        return self.teacher_dtype or self.param_dtype


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """prompts_per_step prompts are each sampled samples_per_prompt times (rows = product).

    temperature / top_p apply to both models before any behavior; top_k is the student top-k
    support of the loss (paper: 16); solver the trust-region solver ("newton" or "bisection").
    prompt_length: > 0 pads every prompt (student and teacher template) to exactly this many
      tokens, so one compiled rollout and train step serve the whole run (a longer prompt is an
      error); 0 pads each batch to the next of rollout.PROMPT_BUCKETS (a few programs).
    """

    prompts_per_step: int = 8
    samples_per_prompt: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 16
    solver: str = "newton"
    prompt_length: int = 0


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
    """num_steps OPD updates (sft_warmup adds its SFT updates); logging, checkpoints, eval.

    checkpoint_every / eval_every: in updates (0 = never; a final checkpoint is always
    written). chunk_size: loss positions per logits chunk. grader_*: math-verify pool.
    microbatch_rows: rows per train-step micro-batch (0 = all rows at once); gradients of the
    micro-batches are summed in float32 into one update. Must divide the rows per step.
    on_nonfinite: a NaN/inf loss or gradient norm "raise"s (default: the run stops naming the
    update, before it is logged or checkpointed) or "skip"s the update (state unchanged,
    counted in the `skipped_updates` metric).
    """

    num_steps: int = 100
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 10
    max_checkpoints: int = 3
    eval_every: int = 0
    chunk_size: int = 256
    microbatch_rows: int = 0
    grader_workers: int = 2
    grader_timeout_s: float = 5.0
    progress_bar: bool = True
    on_nonfinite: str = "raise"


@dataclasses.dataclass(frozen=True)
class EvalDataset:
    """One benchmark: a local file or hub id with its field names (see data.DataConfig).

    answer_after: keep only the gold answer's text after this marker (GSM8K: "####").
    """

    name: str
    source: str
    split: str = "test"
    subset: str = ""
    prompt_field: str = "problem"
    answer_field: str = "answer"
    answer_after: str = ""
    max_examples: int | None = None


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """pass@1 over num_samples samples per problem (and unbiased pass@k for k in ks)."""

    datasets: tuple[EvalDataset, ...] = ()
    num_samples: int = 4
    ks: tuple[int, ...] = (1,)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; data = -1 takes all devices left over by fsdp x tensor."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    prepare: str
    model: ModelConfig
    data: data_lib.DataConfig
    rollout: RolloutConfig
    method: MethodConfig
    objective: objectives.ObjectiveConfig
    optim: OptimConfig
    train: TrainLoopConfig
    eval: EvalConfig
    mesh: MeshConfig


def _section(cls, **overrides) -> ml_collections.ConfigDict:
    values = {f.name: f.default for f in dataclasses.fields(cls)
              if f.default is not dataclasses.MISSING}
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default. Sections: prepare, model, data, rollout, method, objective,
    optim, train, eval (datasets: a dict name -> {source, split, ...}), mesh."""
    cd = ml_collections.ConfigDict()
    # A named preparation run before loading (e.g. "smoke": build tiny models under workdir).
    cd.prepare = ""
    cd.model = _section(ModelConfig)
    # None-valued fields need a declared type so that command-line overrides parse.
    cd.data = _section(data_lib.DataConfig, source="", subset="")
    cd.data.answer_field = ml_collections.FieldReference("answer", field_type=str)
    cd.data.max_examples = ml_collections.FieldReference(None, field_type=int)
    cd.data.teacher_chat_template_kwargs = ml_collections.ConfigDict(
        data_lib.DEFAULT_TEACHER_CHAT_TEMPLATE_KWARGS)
    cd.rollout = _section(RolloutConfig)
    cd.method = _section(MethodConfig)
    # The run default counts the mass outside the top-k as one bucket (the ablation in
    # docs/results.md); ObjectiveConfig's own default stays "renormalized" for direct callers.
    cd.objective = _section(objectives.ObjectiveConfig, topk_support=RUN_TOPK_SUPPORT)
    cd.optim = _section(OptimConfig)
    cd.train = _section(TrainLoopConfig)
    cd.eval = _section(EvalConfig, datasets=ml_collections.ConfigDict())
    cd.mesh = _section(MeshConfig)
    return cd


# ---------------------------------------------------------------------------------------------
# Conversion


def _plain(value: Any) -> Any:
    if isinstance(value, ml_collections.FieldReference):
        return value.get()
    return value


def _convert(cls, cd: ml_collections.ConfigDict, prefix: str, **fixed) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in cd.keys():
        if key not in names and key not in fixed:
            raise ConfigError(f"unknown config field '{prefix}{key}'; known fields of "
                              f"{prefix.rstrip('.') or 'the config'}: {sorted(names)}")
    kwargs = dict(fixed)
    for key in cd.keys():
        if key not in fixed:
            kwargs[key] = _plain(cd[key])
            # NaN or inf is never a setting (eps0=inf became a NaN eps after the warmup)
            if isinstance(kwargs[key], float) and not math.isfinite(kwargs[key]):
                raise ConfigError(f"{prefix}{key}: must be a finite number, got {kwargs[key]}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e).splitlines()[0]
        first = msg.split(" ")[0].rstrip(":")
        if msg.startswith(prefix):
            pass
        elif first in names:
            msg = f"{prefix}{first}: {msg[len(first):].lstrip(': ')}"
        else:
            msg = f"{prefix.rstrip('.')}: {msg}"
        raise ConfigError(msg) from None


def _sub(path: str, workdir: str | None) -> str:
    if "{workdir}" in path:
        if workdir is None:
            raise ConfigError(f"path {path!r} uses {{workdir}} but no workdir was given")
        return path.replace("{workdir}", workdir)
    return path


def _eval_datasets(cd: ml_collections.ConfigDict, workdir: str | None) -> tuple[EvalDataset, ...]:
    out = []
    for name in cd.keys():
        entry = cd[name]
        if isinstance(entry, str):
            entry = ml_collections.ConfigDict({"source": entry})
        if not isinstance(entry, ml_collections.ConfigDict):
            raise ConfigError(f"eval.datasets.{name}: expected a source string or a dict, got "
                              f"{type(entry).__name__}")
        ds = _convert(EvalDataset, entry, f"eval.datasets.{name}.", name=name)
        out.append(dataclasses.replace(ds, source=_sub(ds.source, workdir)))
    return tuple(out)


_STR_DTYPES = ("float32", "bfloat16")
RUN_TOPK_SUPPORT = "tail_bucket"
_SOLVERS = ("newton", "bisection")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def to_run_config(cd: ml_collections.ConfigDict, *, workdir: str | None = None) -> RunConfig:
    """Validates and converts a ConfigDict (one-line ConfigError naming the field)."""
    sections = {"prepare", "model", "data", "rollout", "method", "objective", "optim", "train",
                "eval", "mesh"}
    for key in cd.keys():
        if key not in sections:
            raise ConfigError(f"unknown config field {key!r}; known sections: {sorted(sections)}")
    for key in sections:
        if key not in cd:
            raise ConfigError(f"config is missing section {key!r} (start from "
                              "trb_jax.config.base_config())")

    model = _convert(ModelConfig, cd.model, "model.")
    model = dataclasses.replace(model, **{
        f: _sub(getattr(model, f), workdir)
        for f in ("student", "teacher", "student_tokenizer", "teacher_tokenizer")})
    _check(bool(model.student), "model.student: a student checkpoint path is required")
    _check(bool(model.teacher), "model.teacher: a teacher checkpoint path is required")
    _check(model.param_dtype in _STR_DTYPES,
           f"model.param_dtype: must be one of {_STR_DTYPES}, got {model.param_dtype!r}")
    for f in ("compute_dtype", "teacher_dtype"):
        _check(getattr(model, f) in ("",) + _STR_DTYPES,
               f"model.{f}: must be '' or one of {_STR_DTYPES}, got {getattr(model, f)!r}")
    _check(model.param_dtype != "bfloat16" or model.allow_bf16_adamw,
           "model.param_dtype: bfloat16 trained weights lose AdamW updates below the bf16 "
           "spacing; use float32 master weights with model.compute_dtype='bfloat16', or set "
           "model.allow_bf16_adamw=True")
    _check(model.attention in attention_lib.IMPLEMENTATIONS,
           f"model.attention: must be one of {attention_lib.IMPLEMENTATIONS}, got {model.attention!r}")

    data = _convert(data_lib.DataConfig, cd.data, "data.")
    data = dataclasses.replace(data, source=_sub(data.source, workdir))
    _check(bool(data.source), "data.source: a prompt file or hub dataset id is required")
    _check(data.overlong in data_lib.OVERLONG,
           f"data.overlong: must be one of {data_lib.OVERLONG}, got {data.overlong!r}")

    rollout = _convert(RolloutConfig, cd.rollout, "rollout.")
    for f in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "top_k"):
        _check(getattr(rollout, f) >= 1, f"rollout.{f}: must be >= 1, got {getattr(rollout, f)}")
    _check(rollout.prompt_length >= 0,
           f"rollout.prompt_length: must be >= 0, got {rollout.prompt_length}")
    _check(rollout.temperature > 0, f"rollout.temperature: must be > 0, got {rollout.temperature}")
    _check(0 < rollout.top_p <= 1, f"rollout.top_p: must be in (0, 1], got {rollout.top_p}")
    _check(rollout.solver in _SOLVERS,
           f"rollout.solver: must be one of {_SOLVERS}, got {rollout.solver!r}")

    method = _convert(MethodConfig, cd.method, "method.")
    objective = _convert(objectives.ObjectiveConfig, cd.objective, "objective.")
    optim = _convert(OptimConfig, cd.optim, "optim.")
    _check(optim.peak_lr >= 0, f"optim.peak_lr: must be >= 0, got {optim.peak_lr}")
    _check(optim.decay_steps >= 1, f"optim.decay_steps: must be >= 1, got {optim.decay_steps}")
    _check(optim.warmup_steps >= 0, f"optim.warmup_steps: must be >= 0, got {optim.warmup_steps}")
    _check(optim.clip_norm > 0, f"optim.clip_norm: must be > 0, got {optim.clip_norm}")

    train = _convert(TrainLoopConfig, cd.train, "train.")
    _check(train.num_steps >= 1, f"train.num_steps: must be >= 1, got {train.num_steps}")
    for f in ("log_every", "max_checkpoints", "chunk_size", "grader_workers"):
        _check(getattr(train, f) >= 1, f"train.{f}: must be >= 1, got {getattr(train, f)}")
    _check(train.microbatch_rows >= 0,
           f"train.microbatch_rows: must be >= 0, got {train.microbatch_rows}")
    rows = rollout.prompts_per_step * rollout.samples_per_prompt
    _check(train.microbatch_rows == 0 or rows % train.microbatch_rows == 0,
           f"train.microbatch_rows: {train.microbatch_rows} must divide the {rows} rows per "
           "step (rollout.prompts_per_step x rollout.samples_per_prompt)")
    for f in ("checkpoint_every", "eval_every", "seed"):
        _check(getattr(train, f) >= 0, f"train.{f}: must be >= 0, got {getattr(train, f)}")
    _check(train.on_nonfinite in ("raise", "skip"),
           f"train.on_nonfinite: must be 'raise' or 'skip', got {train.on_nonfinite!r}")
    _check(train.grader_timeout_s > 0,
           f"train.grader_timeout_s: must be > 0, got {train.grader_timeout_s}")

    eval_cd = ml_collections.ConfigDict(cd.eval.to_dict())
    datasets = _eval_datasets(eval_cd.datasets, workdir)
    del eval_cd.datasets
    ev = _convert(EvalConfig, eval_cd, "eval.", datasets=datasets)
    ev = dataclasses.replace(ev, ks=tuple(int(k) for k in ev.ks))
    _check(ev.num_samples >= 1, f"eval.num_samples: must be >= 1, got {ev.num_samples}")
    _check(all(1 <= k <= ev.num_samples for k in ev.ks),
           f"eval.ks: every k must be in [1, eval.num_samples={ev.num_samples}], got {ev.ks}")
    _check(train.eval_every == 0 or bool(ev.datasets),
           "train.eval_every: periodic evaluation needs eval.datasets")

    mesh = _convert(MeshConfig, cd.mesh, "mesh.")
    _check(mesh.data == -1 or mesh.data >= 1, f"mesh.data: must be -1 or >= 1, got {mesh.data}")
    _check(mesh.fsdp >= 1 and mesh.tensor >= 1,
           f"mesh.fsdp / mesh.tensor: must be >= 1, got {mesh.fsdp} / {mesh.tensor}")

    return RunConfig(prepare=str(cd.prepare), model=model, data=data, rollout=rollout,
                     method=method, objective=objective, optim=optim, train=train, eval=ev, mesh=mesh)


def repo_config_path(name: str) -> str:
    """configs/<name>.py of this checkout, or of the installed package (trb_jax.config_files)."""
    return config_files.find(f"{name}.py") or f"{config_files.CONFIG_DIR}/{name}.py"

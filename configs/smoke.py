"""Smoke run: tiny random Qwen3 student/teacher + toy prompts, built under the workdir.

    python -m trb_jax.train --config=configs/smoke.py --workdir=/tmp/smoke
    python -m trb_jax.train --config=configs/smoke.py:method=vanilla --workdir=/tmp/smoke_vanilla

Self-contained (nothing to download): `prepare = "smoke"` writes the checkpoints and JSONL files
to WORKDIR/smoke first. 24 updates of 8 rows, a checkpoint every 4, an evaluation every 12;
about a minute on a 2-core CPU. Arg: `method=NAME` (any of trb_jax.methods.METHODS).
"""

from trb_jax.config import base_config


def get_config(arg: str | None = None):
    options = dict(kv.split("=", 1) for kv in arg.split(",")) if arg else {}
    config = base_config()
    config.prepare = "smoke"
    config.model.student = "{workdir}/smoke/student"
    config.model.teacher = "{workdir}/smoke/teacher"
    config.data.source = "{workdir}/smoke/train.jsonl"
    config.data.system_prompt = "Put the answer in \\boxed{}."
    config.rollout.prompts_per_step = 4
    config.rollout.samples_per_prompt = 2
    config.rollout.max_new_tokens = 16
    config.rollout.prompt_length = 64  # toy prompts are 30-50 tokens: one program per run
    config.method.name = options.pop("method", "trb")
    config.method.warmup_steps = 12
    config.method.eps0 = 0.05
    config.method.sft_steps = 4
    config.optim.peak_lr = 1e-3
    config.optim.warmup_steps = 2
    config.optim.decay_steps = 24
    config.train.num_steps = 24
    config.train.checkpoint_every = 4
    config.train.eval_every = 12
    config.train.chunk_size = 8
    config.eval.datasets.toy = dict(source="{workdir}/smoke/test.jsonl", split="test")
    config.eval.num_samples = 2
    config.eval.max_new_tokens = 16
    if options:
        raise ValueError(f"configs/smoke.py: unknown argument(s) {sorted(options)}; "
                         "known: method")
    return config

"""Toy math world (trb_jax/toy): OPD of a weak Base student from a strong chat teacher on CPU.

    python -m trb_jax.train --config=configs/toy.py:method=trb --workdir=/tmp/toy_trb
    python -m trb_jax.train --config=configs/toy.py:method=vanilla,seed=3 --workdir=/tmp/toy_v3

Args (comma separated key=value): method (any of trb_jax.methods.METHODS, default trb),
objective (any of trb_jax.objectives.names(), default opd), seed
(the run seed: rollout sampling and prompt order; default 0), world (default | hard; default
default). The models and data are the ones shipped in trb_jax/toy/assets (rebuilt by
`python -m trb_jax.toy.build`, see docs/toy.md); world=hard uses the hard world shipped in
trb_jax/toy/assets_hard (6-12 chained steps, responses up to 231 tokens; rebuilt by
`python -m trb_jax.toy.build --world hard`) with rollouts and evaluations of
build.HARD_MAX_NEW_TOKENS tokens and 128-token prompts; everything else is the same.

    python -m trb_jax.train --config=configs/toy.py:world=hard,method=trb --workdir=/tmp/hard
Used by the README's main job (trb_jax.toy.demo) and the reproduction scripts in experiments/.
"""

from trb_jax.config import base_config
from trb_jax.toy import build


def get_config(arg: str | None = None):
    options = dict(kv.split("=", 1) for kv in arg.split(",")) if arg else {}
    world_name = options.pop("world", "default")
    build_config, assets = build.world_config(world_name)
    world = build.world_paths(assets)
    hard = world_name != "default"
    seed = int(options.pop("seed", 0))
    config = base_config()
    # "toy" ensures the default world (shipped); the hard world is shipped in assets_hard.
    config.prepare = "" if hard else "toy"
    config.model.student = str(world.student_dir)
    config.model.teacher = str(world.teacher_dir)
    config.data.source = str(world.train_jsonl)
    config.data.system_prompt = build_config.system_prompt
    config.data.shuffle_seed = seed
    config.rollout.prompts_per_step = 32
    config.rollout.samples_per_prompt = 2
    config.rollout.max_new_tokens = build.max_new_tokens(build_config)
    config.rollout.prompt_length = 128 if hard else 64  # hard prompts: at most 123 tokens
    config.method.name = options.pop("method", "trb")
    config.objective.name = options.pop("objective", "opd")
    config.method.eps0 = 0.1
    config.method.warmup_steps = 30
    config.method.skd_k = 15
    config.method.skd_tau_t = 0.2
    config.method.tau0 = 0.9
    config.method.sft_steps = 10
    config.method.beta_start = 0.5
    config.optim.peak_lr = 1e-3  # experiments/tune_lr.py: 3e-3 collapses the student first
    if hard:  # experiments/tune_lr.py --world hard --methods vanilla, the pre-registered rule
        config.optim.peak_lr = 3e-3
    config.optim.warmup_steps = 5
    config.optim.decay_steps = 100
    config.optim.end_lr_fraction = 0.1
    config.train.num_steps = 100
    config.train.seed = seed
    config.train.checkpoint_every = 50
    config.train.eval_every = 25
    config.train.chunk_size = 48
    config.eval.datasets.toy_test = dict(source=str(world.test_jsonl), max_examples=128)
    config.eval.num_samples = 2
    config.eval.max_new_tokens = build.max_new_tokens(build_config)
    config.eval.batch_size = 128
    if options:
        raise ValueError(f"configs/toy.py: unknown argument(s) {sorted(options)}; "
                         "known: method, objective, seed, world")
    return config

"""Rehearsal of the paper path: configs/opd.py with tiny models and local data, on a CPU.

    python -m trb_jax.train --config=configs/rehearsal.py:world=DIR,method=trb --workdir=RUN
    python -m trb_jax.evaluate --config=configs/rehearsal.py:world=DIR --workdir=RUN

Args (comma separated key=value):
  world   a directory with student/ and teacher/ (Hugging Face Qwen3 checkpoints with the real
          Qwen3 tokenizer files: trb_jax.qwen_tokenizer), train.jsonl (OpenThoughts3
          conversation records) and eval.jsonl (MATH-style {"problem", "answer"} records).
  method, objective  as configs/opd.py (defaults trb, opd).
  pair    as configs/opd.py (default qwen3_0p6b_4b): selects the evaluation suites.
  evals   1 (default) keeps the pair's suites, each read from eval.jsonl; 0 drops them (runs
          that test training only).

Everything is configs/opd.py's (optimizer and schedule, dtype policy, methods and their
knobs, the top-k loss, the data fields and system prompt, the teacher's template arguments,
the mesh) except: the checkpoints and data (the world), and the shapes that make a run fit a
CI machine (prompts per step, samples, response length, number of updates, checkpoint and
evaluation cadence, eval samples, gradient-accumulation micro-batch). The real vocabulary (151,936 rows) and both EOS ids
(Base <|endoftext|> 151643, chat <|im_end|> 151645) come with the world.
"""

import os

from trb_jax.config import load_config_file, repo_config_path


def get_config(arg: str | None = None):
    options = dict(kv.split("=", 1) for kv in arg.split(",")) if arg else {}
    world = options.pop("world", "")
    if not world:
        raise ValueError("configs/rehearsal.py: world=DIR is required")
    evals = options.pop("evals", "1") == "1"
    passed = ",".join(f"{k}={options.pop(k)}" for k in ("pair", "method", "objective") if k in options)
    if options:
        raise ValueError(f"configs/rehearsal.py: unknown argument(s) {sorted(options)}; "
                         "known: world, method, objective, pair, evals")
    config = load_config_file(repo_config_path("opd"), passed or None)
    config.model.student = os.path.join(world, "student")
    config.model.teacher = os.path.join(world, "teacher")
    config.data.source = os.path.join(world, "train.jsonl")
    config.data.max_examples = None
    config.rollout.prompts_per_step = 2
    config.rollout.samples_per_prompt = 2
    config.rollout.max_new_tokens = 6
    config.rollout.prompt_length = 128
    config.train.num_steps = 2
    config.train.checkpoint_every = 1
    config.train.eval_every = 0
    config.train.chunk_size = 8
    config.train.microbatch_rows = 2  # 2 micro-batches of the 4 rows: accumulation runs
    config.train.grader_workers = 1
    config.train.progress_bar = False
    config.method.sft_steps = 1
    config.method.sft_checkpoints = (1,)
    config.mesh.fsdp = 1
    for name in list(config.eval.datasets.keys()):
        if evals:
            config.eval.datasets[name] = dict(source=os.path.join(world, "eval.jsonl"))
        else:
            del config.eval.datasets[name]
    config.eval.num_samples = 2
    config.eval.ks = (1, 2)
    config.eval.max_new_tokens = 6
    config.eval.batch_size = 4
    return config

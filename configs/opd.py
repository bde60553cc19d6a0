"""The paper's setups: Qwen3 Base students distilled from Qwen3 chat teachers on OpenThoughts3.

    python -m trb_jax.train --config=configs/opd.py:pair=qwen3_0p6b_4b,method=trb \
        --workdir=$RUNS/trb_0p6b --config.method.eps0=0.01 --config.method.warmup_steps=50

Args (comma separated key=value):
  pair    qwen3_0p6b_4b (Qwen3-0.6B-Base <- Qwen3-4B, default) or qwen3_1p7b_8b
          (Qwen3-1.7B-Base <- Qwen3-8B).
  method  vanilla | trb (default) | fixed_eps | skd | temperature | sft_warmup | veto |
          teacher_prefix (the rollout behavior).
  objective  opd (default) | tropd | veto | sft (the per-token loss; docs/objectives.md).

Settings from the paper (docs/method.md, section 5): 25,600 OpenThoughts3 prompts with the
system prompt "Please reason step by step, and put your final answer within \\boxed{}.",
top-k 16 reverse KL, eps_0 grid {0.001, 0.005, 0.01, 0.02, 0.05} (default 0.01), SKD K = 15 and
tau_T = 0.2, temperature warmup tau_0 in {0.8, 0.9, 0.95} (default 0.9), SFT warmup checkpoints
at 15/25/50 updates (default 25). Not stated in the sources, chosen here and overridable: 64
prompts x 4 samples per step, 4,096 response tokens, lr 1e-6 with 10 warmup updates, warmup
horizon K = 50 updates, 400 OPD updates, float32 master weights + AdamW state with bfloat16
compute and teacher, train micro-batches of 8 rows. The checkpoints and the dataset are
Hugging Face hub ids (they need network access; point the fields at local copies otherwise).
"""

from trb_jax.config import base_config

PAIRS = {
    "qwen3_0p6b_4b": ("Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-4B"),
    "qwen3_1p7b_8b": ("Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-8B"),
}

# Evaluation suites per pair (docs/method.md, section 5). Hub ids and field names of the public copies.
BENCHMARKS = {
    "math500": dict(source="HuggingFaceH4/MATH-500", split="test"),
    "aime24": dict(source="HuggingFaceH4/aime_2024", split="train"),
    "aime25": dict(source="yentinglin/aime_2025", split="train"),
    "amc": dict(source="AI-MO/aimo-validation-amc", split="train"),
    "olympiad": dict(source="Hothan/OlympiadBench", subset="OE_TO_maths_en_COMP", split="train",
                     prompt_field="question", answer_field="final_answer.0"),
    "gsm8k": dict(source="openai/gsm8k", subset="main", split="test", prompt_field="question",
                  answer_after="####"),
}
SUITES = {
    "qwen3_0p6b_4b": ("gsm8k", "math500", "amc", "olympiad"),
    "qwen3_1p7b_8b": ("math500", "aime24", "aime25", "amc", "olympiad"),
}
EPS0_GRID = (0.001, 0.005, 0.01, 0.02, 0.05)


def get_config(arg: str | None = None):
    options = dict(kv.split("=", 1) for kv in arg.split(",")) if arg else {}
    pair = options.pop("pair", "qwen3_0p6b_4b")
    if pair not in PAIRS:
        raise ValueError(f"configs/opd.py: unknown pair {pair!r}; choose one of {sorted(PAIRS)}")
    config = base_config()
    config.model.student, config.model.teacher = PAIRS[pair]
    # Mixed precision: float32 master weights and AdamW state, bfloat16 compute and teacher.
    config.model.param_dtype = "float32"
    config.model.compute_dtype = "bfloat16"
    config.model.teacher_dtype = "bfloat16"
    config.model.remat_layers = True
    config.data.source = "open-thoughts/OpenThoughts3-1.2M"
    config.data.split = "train"
    config.data.prompt_field = "conversations.0.value"
    # No short gold answers in OpenThoughts3: the reference solution's final \boxed{} is the gold
    # (trb_jax.rewards parses the last boxed expression of a gold text).
    config.data.answer_field = "conversations.1.value"
    config.data.max_examples = 25_600
    config.rollout.prompts_per_step = 64
    config.rollout.samples_per_prompt = 4
    config.rollout.max_new_tokens = 4096
    config.method.name = options.pop("method", "trb")
    config.objective.name = options.pop("objective", "opd")
    config.method.eps0 = 0.01
    config.method.warmup_steps = 50
    config.method.skd_k = 15
    config.method.skd_tau_t = 0.2
    config.method.tau0 = 0.9
    config.method.sft_steps = 25
    config.method.sft_checkpoints = (15, 25, 50)  # saved in WORKDIR/sft/step_N
    config.optim.peak_lr = 1e-6
    config.optim.warmup_steps = 10
    config.optim.decay_steps = 400
    config.optim.weight_decay = 0.0
    config.train.num_steps = 400
    config.train.checkpoint_every = 25
    config.train.eval_every = 50
    config.train.chunk_size = 512
    # 256 rows per step in micro-batches of 8 (one row per device on 8 devices): memory is
    # set by the micro-batch (docs/scaling.md, compiled per-device figures).
    config.train.microbatch_rows = 8
    config.train.grader_workers = 8
    for name in SUITES[pair]:
        config.eval.datasets[name] = BENCHMARKS[name]
    config.eval.num_samples = 32
    config.eval.ks = (1, 8, 32)
    config.eval.max_new_tokens = 4096
    config.mesh.fsdp = 8 if pair == "qwen3_1p7b_8b" else 1
    if options:
        raise ValueError(f"configs/opd.py: unknown argument(s) {sorted(options)}; "
                         "known: pair, method, objective")
    return config

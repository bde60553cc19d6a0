"""`python -m trb_jax.evaluate --config=configs/FILE.py[:ARGS] --workdir=DIR [--step=N]`

pass@1 over `eval.num_samples` samples per problem (and unbiased pass@k for `eval.ks`) on every
`eval.datasets` entry (hub ids or local JSONL/JSON/parquet), for the student of a training run
(DIR/checkpoints, the latest or --step) or, with --student=HF_DIR, for any student-format
checkpoint (e.g. the untrained Base model). Prompts use the student's plain template. Writes
DIR/eval_<tag>.json (tag: step_N or the checkpoint's name) with the metrics and the
per-problem correctness matrix. The workdir is checked for writing before anything is loaded,
and the file is written all at once (no partial results); expected failures are one stderr line
and exit status 1 (`trb_jax.errors.cli_main`).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from trb_jax.config_files import config_flags_parser, resolve_argv
from trb_jax.errors import CheckpointError, ConfigError, atomic_write, check_writable, cli_main

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/FILE.py[:ARGS]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's directory")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_STUDENT = flags.DEFINE_string("student", None,
                               "evaluate this HF checkpoint instead of the run's checkpoint")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from trb_jax import distributed, evaluation, rewards, trainer
    from trb_jax.config import to_run_config

    distributed.initialize()
    workdir = os.path.abspath(_WORKDIR.value)
    cfg = to_run_config(_CONFIG.value, workdir=workdir)
    if not cfg.eval.datasets:
        raise ConfigError("eval.datasets: nothing to evaluate")
    if _STUDENT.value is None and not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise CheckpointError(f"no checkpoints in {workdir}/checkpoints (pass --student=HF_DIR "
                              "to evaluate a model checkpoint instead)")
    if distributed.is_primary():
        check_writable(workdir, "the evaluation results (eval_<tag>.json)")
    results, tag = trainer.evaluate_run(cfg, workdir, step=_STEP.value, student=_STUDENT.value,
                                        seed=_SEED.value)
    if distributed.is_primary():
        path = os.path.join(workdir, f"eval_{tag}.json")
        atomic_write(path, json.dumps(results, indent=1))
        for name, res in results["datasets"].items():
            print(name, json.dumps(res["metrics"]))
        print(f"wrote {path}")


if __name__ == "__main__":
    # resolve_argv: a configs/ path is found in the working directory, the checkout or the install.
    app.run(cli_main(main), argv=resolve_argv(sys.argv), flags_parser=config_flags_parser)

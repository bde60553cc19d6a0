"""`python -m trb_jax.train --config=configs/FILE.py[:ARGS] --workdir=DIR [--config.FIELD=VALUE]`

Thin entry point: parses the ml_collections config (locked: an unknown override is an error),
initialises jax.distributed when the environment asks for it (SLURM, TPU pod or explicit
coordinator flags), converts the config and runs `trb_jax.trainer.train`. Running the same
command again resumes from DIR/checkpoints. Expected failures (config, data, checkpoint, workdir,
divergence) are one stderr line and exit status 1 (`trb_jax.errors.cli_main`).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from trb_jax.config_files import config_flags_parser, resolve_argv
from trb_jax.errors import cli_main

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/FILE.py[:ARGS]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, logs)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process runs without SLURM/TPU)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every checkpoint file at INFO
    from trb_jax import distributed, trainer
    from trb_jax.config import to_run_config

    distributed.initialize(coordinator_address=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    workdir = os.path.abspath(_WORKDIR.value)
    cfg = to_run_config(_CONFIG.value, workdir=workdir)
    records = trainer.train(cfg, workdir,
                            config_json=_CONFIG.value.to_json_best_effort(indent=2) + "\n")
    if records and distributed.is_primary():
        last = records[-1]
        print(json.dumps({k: last[k] for k in ("step", "loss", "reward") if k in last}))


if __name__ == "__main__":
    # resolve_argv: a configs/ path is found in the working directory, the checkout or the install.
    app.run(cli_main(main), argv=resolve_argv(sys.argv), flags_parser=config_flags_parser)

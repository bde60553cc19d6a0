"""Test-wide setup: CPU only, references importable, deterministic hypothesis profiles.

Shared file: trb_jax test helpers live in their own modules (tests/tiny_qwen3.py, ...).
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA cache for the session's processes (both xdist workers and the CLI
# subprocesses of the trainer tests compile many of the same programs). Results do not depend
# on it: a cache hit returns the same executable.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The test programs are tiny, so a cold suite spends most of its CPU time in XLA's LLVM
# back end, optimising machine code that then runs for milliseconds. Unoptimised codegen cuts
# that by about 30% (cold suite: 931 s -> 701 s on 2 cores). It changes no HLO, only the
# machine code, whose float32 sums may run in another order: the tests' tolerances are about
# float32 rounding either way, and equalities between two programs hold under both.
# TRB_TEST_XLA_OPTIMIZE=1 restores XLA's defaults. Set in os.environ before JAX starts, so
# the CLI subprocesses and fake-device children inherit it.
if os.environ.get("TRB_TEST_XLA_OPTIMIZE") != "1":
    _fast = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
    _flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in _fast if f not in _flags])
sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import HealthCheck, settings  # noqa: E402

# >= 200 examples per property in CI (and by default); derandomized so every run is the same.
_COMMON = dict(
    deadline=None,  # the first example of each test pays for XLA compilation
    derandomize=True,
    database=None,  # no replay of examples saved by an earlier run: every run is the same
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("dev", max_examples=50, **_COMMON)
# Fresh random examples each run, for hunting new failures by hand (not used by CI).
settings.register_profile("explore", max_examples=500, **{**_COMMON, "derandomize": False})
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_global_rngs():
    """Every test starts from the same global RNG states (python, NumPy, torch when imported), so
    a test that forgets to seed its own generator is still the same test on every run."""
    random.seed(0)
    np.random.seed(0)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(0)
    yield

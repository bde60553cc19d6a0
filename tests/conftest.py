"""Test-wide setup: CPU only, references importable, deterministic hypothesis profiles.

Shared file: trb_jax test helpers live in their own modules (tests/tiny_qwen3.py, ...).
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import HealthCheck, settings  # noqa: E402

# >= 200 examples per property in CI (and by default); derandomized so every run is the same.
_COMMON = dict(
    deadline=None,  # the first example of each test pays for XLA compilation
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("dev", max_examples=50, **_COMMON)
# Fresh random examples each run, for hunting new failures by hand (not used by CI).
settings.register_profile("explore", max_examples=500, **{**_COMMON, "derandomize": False})
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

"""Test-wide set-up: Triton kernels run under the interpreter on CPU, hypothesis is reproducible."""
import os

# Must precede the first kernel definition (entmath.kernels.* are imported lazily by the ops).
os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

# The interpreter evaluates both branches of tl.where in numpy; warnings from the unselected branch
# are noise, not results.
warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")

settings.register_profile(
    "entmath",
    max_examples=40,
    deadline=None,
    derandomize=True,  # CI reproducibility: the same examples every run
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("entmath")

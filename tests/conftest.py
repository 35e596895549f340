"""Test-wide set-up: Triton kernels run under the interpreter on CPU, hypothesis is reproducible."""
import os

# Must precede the first kernel definition (entmath.kernels.* are imported lazily by the ops).
os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402

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

# ... and the same examples whatever else ran first.  Hypothesis (6.1xx) also draws numbers it finds
# as constants in the project's modules imported so far, which differ between a full run, one file
# and each xdist worker, so a derandomised test drew different examples in a clean-clone run than
# alone (and failed only there).  Without those constants a failure reproduces with the same
# command; the strategies in tests/strategies.py already aim at the regimes that matter.
try:
    from hypothesis.internal.conjecture import providers as _providers
    from hypothesis.internal.constants_ast import Constants as _Constants
except ImportError:  # pragma: no cover - a hypothesis without local constants
    pass
else:
    _NO_LOCAL_CONSTANTS = _Constants(integers=_providers.SortedSet(),
                                     floats=_providers.SortedSet(key=_providers.float_to_int),
                                     bytes=_providers.SortedSet(), strings=_providers.SortedSet())
    _providers._get_local_constants = lambda: _NO_LOCAL_CONSTANTS


# ---- Fewer hypothesis examples where Triton's interpreter runs the kernel -------------------------
# Under TRITON_INTERPRET=1 one example of these property tests on the "triton" backend costs 0.1-0.5 s
# (each kernel launch is numpy, block by block), 10-50 times the same example on the torch or C path;
# at 40 examples they were about 3 minutes of the unit run.  For the tests listed here the "triton"
# parametrisation draws TRITON_EXAMPLES examples of the same strategy (derandomised: the same ones
# every run, though not a prefix of the 40, since hypothesis plans its generation by max_examples),
# while:
#   * the same property, the same strategy and the same bound run at the full profile (40) on the
#     "torch" path and, where there is one, the "c" path (the other parametrisations of each test);
#   * a twin test holds the Triton kernel to the torch path, forward and gradient, on rows of 1, 3,
#     1000 and 4097 (a partial block, a block and a ragged tail, masked -inf entries):
#     test_<op>.py::test_triton_matches_torch for entropy, kl, jsd and cross_entropy, and
#     test_attention_entropy.py::test_triton_kernel_matches_torch_on_odd_sizes;
#   * tests/test_triton_launch.py runs every launcher's row alignments and block tails.
# (tests/test_entropy_normalization_extremes.py already gives its Triton test 10 examples itself.)
TRITON_EXAMPLES = 15
FEWER_EXAMPLES_ON_TRITON = {
    "test_cross_entropy.py": {"test_loss_is_exact_for_the_given_values_at_any_offset_span_or_mask",
                              "test_gradient_is_exact_for_the_given_values_at_any_offset_span_or_mask",
                              "test_softcap_is_exact_for_the_given_values",
                              "test_softcap_gradient_is_exact_for_the_given_values"},
    # (test_linear_cross_entropy_within_its_stated_bound at 15 examples draws a row whose exact
    # entropy is 1.6e-45, a float32 subnormal, where the Triton kernel returned 0.0; fixed in
    # softmax_stats.exp_tail, and test_extremes.py's test_linear_cross_entropy_keeps_a_subnormal_entropy
    # holds that row and its variants at every run.)
    "test_extremes.py": {"test_within_the_stated_bound_of_the_exact_result",
                         "test_attention_entropy_within_its_stated_bound",
                         "test_linear_cross_entropy_within_its_stated_bound"},
    "test_entropy.py": {"test_matches_mpmath_fp64"},
    "test_kl.py": {"test_matches_mpmath"},
    # (A clean-clone run at 15 examples once drew a case where the Triton JSD was half the exact
    # 8.9e-178: the shift log S_b - log S_a rounded away log-ratios below u^2.  Fixed by the pivot
    # shift; test_jsd.py/test_kl.py::test_deep_tail_matches_mpmath hold such rows on both paths.)
    "test_jsd.py": {"test_matches_mpmath"},
}


def _fewer_examples(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return (params.get("backend") == "triton"
            and item.originalname in FEWER_EXAMPLES_ON_TRITON.get(item.path.name, ())
            and hasattr(item.obj, "_hypothesis_internal_use_settings"))


def pytest_collection_modifyitems(config, items):
    # A renamed test must not leave an entry that silently stops applying.
    modules = {i.path.name: i.module for i in items if getattr(i, "module", None) is not None}
    for name, tests in FEWER_EXAMPLES_ON_TRITON.items():
        for test in tests if name in modules else ():
            if not getattr(getattr(modules[name], test, None), "is_hypothesis_test", False):
                raise pytest.UsageError(f"conftest.FEWER_EXAMPLES_ON_TRITON: {name} has no hypothesis test {test}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if not _fewer_examples(item):
        yield
        return
    # hypothesis reads the settings from the test function when it is called; the parametrisations
    # share one function, so the settings are swapped for this call only.
    fn = item.obj
    full = fn._hypothesis_internal_use_settings
    fn._hypothesis_internal_use_settings = settings(full, max_examples=min(full.max_examples, TRITON_EXAMPLES))
    try:
        yield
    finally:
        fn._hypothesis_internal_use_settings = full

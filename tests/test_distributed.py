"""entmath.distributed on real process groups: 4 gloo processes on the CPU, spawned once.

Every rank runs every case of ``tests/distributed_worker.py`` in the world group (4 ranks) and in
its group of 2 ranks, on both backends, and compares the distributed op, value and gradient, with
the unsharded entmath op on the gathered inputs.  The tests below read the saved comparisons.
Single-process behaviour (argument checks, no process group) is tested directly.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

import entmath
from tests import distributed_worker as worker

WORLD = 4
GROUPS = [4, 2]
BACKENDS = ["torch", "triton"]
NUMERIC = [c for c in worker.CASES if c != "errors"]
TOL = 1e-12  # float64 inputs: the shards' summaries and the unsharded op agree to rounding


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    mp.start_processes(worker.run, args=(WORLD, str(out / "init"), str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ranks", GROUPS)
@pytest.mark.parametrize("case", NUMERIC)
def test_equals_the_unsharded_op(results, case, ranks, backend):
    for rank, res in enumerate(results):
        got = res[ranks, backend, case]
        assert "exception" not in got, f"rank {rank}:\n{got.get('exception')}"
        for what, diff in got.items():
            if what == "inf_row":
                assert diff == float("inf"), f"rank {rank}: KL should be +inf where q lacks p's mass"
            else:
                assert diff <= TOL, f"rank {rank}, {ranks} ranks, {backend}, {case}: {what} differs by {diff:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ranks", GROUPS)
def test_every_rank_raises_the_same_value_error(results, ranks, backend):
    """A NaN in one rank's slice, or a class index out of range, raises on every rank (read off
    the reduced statistics), so no rank is left waiting in a collective; with validation off the
    row is NaN on every rank and the other rows are finite."""
    seen = [res[ranks, backend, "errors"] for res in results]
    for got in seen:
        assert "exception" not in got, got.get("exception")
        assert "contains NaN (row(s) 1)" in got["nan_entropy"]
        assert "contains NaN (row(s) 1)" in got["nan_ce"]
        assert f"outside [0, {4 * ranks})" in got["bad_target"]
        assert got["validation_off"] == [True, True]
    assert all(s == seen[0] for s in seen)


def test_single_process_errors():
    z = torch.randn(2, 3)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="initialised process group"):
            entmath.distributed.entropy(z)
    with pytest.raises(TypeError, match="logits"):
        entmath.distributed.entropy(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="class indices"):
        entmath.distributed.cross_entropy(z, torch.rand(2))
    with pytest.raises(ValueError, match="target holds class indices"):
        entmath.distributed.cross_entropy(z, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="same shape"):
        entmath.distributed.kl(z, torch.randn(2, 4))
    with pytest.raises(ValueError, match="label_smoothing"):
        entmath.distributed.cross_entropy(z, torch.tensor([0, 1]), label_smoothing=2.0)


def test_vocab_shard_in_a_one_process_group(tmp_path):
    """The offsets: equal slices in rank order by default, explicit ones checked.  A one-process
    gloo group also runs the ops, which must equal the local ones exactly."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert entmath.distributed.vocab_shard(7) == (0, 7)
        assert entmath.distributed.vocab_shard(3, vocab_start=4, vocab_size=7) == (4, 7)
        with pytest.raises(ValueError, match="together"):
            entmath.distributed.vocab_shard(3, vocab_start=4)
        with pytest.raises(ValueError, match="must lie in"):
            entmath.distributed.vocab_shard(3, vocab_start=5, vocab_size=7)
        with pytest.raises(TypeError, match="vocab_start"):
            entmath.distributed.vocab_shard(3, vocab_start=1.0, vocab_size=7)
        z = torch.randn(4, 9, dtype=torch.float64)
        t = torch.tensor([0, 8, -100, 3])
        torch.testing.assert_close(entmath.distributed.entropy(z), entmath.entropy(z), rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(entmath.distributed.cross_entropy(z, t, label_smoothing=0.2),
                                   entmath.cross_entropy(z, t, label_smoothing=0.2), rtol=1e-14, atol=1e-15)
        h, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
        torch.testing.assert_close(entmath.distributed.linear_cross_entropy(h, w, t, temperature=2.0),
                                   entmath.linear_cross_entropy(h, w, t, temperature=2.0), rtol=1e-14, atol=1e-15)
        zz = z.clone().requires_grad_()
        loss = entmath.distributed.entropy(zz).sum()
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(loss, zz, create_graph=True)
    finally:
        torch.distributed.destroy_process_group()

"""Tests for pipetrain.transfer: boundary values moved on the executor's copy streams.

The unit tests move nested values (tuples, lists, dicts, a namedtuple; float, bool, int,
non-contiguous, zero-size tensors and plain leaves) between two CPU pipeline devices of a
CPU executor, whose copy stream is a queue served by its own thread: the memcpy really runs
after ``send`` returns, so a source freed too early or a consumer that did not wait would
show. The pipeline tests run gpipe, 1F1B, interleaved 1F1B (v = 2) and ZB-H1 with
``transfer="copy"`` and compare loss and gradients with the unsplit model in float64 (only
summation order differs: 1e-10 relative leaves ample room), and prove the copy path ran:
the executor's ``copy`` is counted (one per boundary tensor per micro-batch and direction)
and the consumer's input tensors never share memory with the producer's outputs (they do
with ``transfer="direct"``, the control). A CUDA test, skipped without two GPUs, runs 1F1B
across two GPUs the same way.
"""

import collections

import pytest
import torch
from torch import nn

from pipetrain import transfer as xfer
from pipetrain.executor import Executor, cuda_backend_available
from pipetrain.pipeline import Pipeline
from pipetrain.stage import Stage

# The models, data and unsplit references of the transparency tests.
from tests import test_transparency as _tp  # noqa: E402

Pair = collections.namedtuple("Pair", "left right")


@pytest.fixture
def copies(monkeypatch):
    """Record every ``Executor.copy`` call as (src_device, dst_device, nbytes)."""
    calls = []
    original = Executor.copy

    def counting(self, src_ptr, dst_ptr, nbytes, src_device, dst_device, after=None):
        calls.append((src_device, dst_device, nbytes))
        return original(self, src_ptr, dst_ptr, nbytes, src_device, dst_device, after=after)

    monkeypatch.setattr(Executor, "copy", counting)
    return calls


# -- the module itself --------------------------------------------------------------------
def _nested():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, dtype=torch.float64, generator=g)
    return {
        "hidden": torch.randn(3, 5, generator=g, requires_grad=True) * 2,  # has a graph
        "pair": Pair(torch.rand(3, 5, generator=g) > 0.5, torch.arange(7)),
        "list": [base.t(), base[::2, 1:], torch.empty(0, 4), torch.tensor(2.5)],
        "plain": (3, None, "name", 1.5),
    }


def _leaves(obj):
    from pipetrain.microbatch import flatten
    return flatten(obj)[0]


def test_send_receive_nested_values(copies):
    ex = Executor(2)
    tr = xfer.Transfer(ex, ["cpu", "cpu"])
    value = _nested()
    expect = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in _leaves(value)]
    parcel = tr.send(value, 0, 1)
    out = tr.receive(parcel)
    assert type(out["pair"]) is Pair and isinstance(out["list"], list) and isinstance(out["plain"], tuple)
    tensors = 0
    for src, dst, ref in zip(_leaves(value), _leaves(out), expect):
        if not isinstance(ref, torch.Tensor):
            assert dst is src          # plain leaves pass through unchanged
            continue
        tensors += 1
        assert dst.dtype == ref.dtype and dst.shape == ref.shape and dst.is_contiguous()
        assert torch.equal(dst, ref)
        assert not dst.requires_grad and dst.grad_fn is None
        if ref.numel():
            assert dst.data_ptr() != src.data_ptr()
    # One copy per non-empty tensor (the zero-size one is only allocated), all 0 -> 1.
    sizes = [t.numel() * t.element_size() for t in expect if isinstance(t, torch.Tensor) and t.numel()]
    assert tensors == 7 and len(sizes) == 6
    assert sorted(c[2] for c in copies) == sorted(sizes)
    assert all(c[:2] == (0, 1) for c in copies)
    assert parcel.copies == 6 and parcel.nbytes == sum(sizes)
    # CPU: the consumer's wait blocked until the copies ran, so the sources are released.
    assert parcel.sources == [] and tr.pending == 0
    with pytest.raises(RuntimeError, match="already received"):
        tr.receive(parcel)
    ex.close()


def test_parcel_keeps_sources_alive_until_received():
    """The producer drops its only reference right after send (as a stage's output table
    entry would); the copy stream still reads valid memory: the parcel holds the source."""
    ex = Executor(3)
    tr = xfer.Transfer(ex, ["cpu"] * 3)
    n = 1 << 20   # 8 MB: the memcpy takes long enough to still run after send returns
    parcels = []
    for i in range(4):
        src = torch.full((n,), float(i), dtype=torch.float64)
        parcels.append(tr.send((src, [src[:10] + 1]), i % 3, (i + 1) % 3))
        del src
        torch.full((n,), -1.0, dtype=torch.float64)  # reuse freed memory if it were freed
    for i, p in enumerate(parcels):
        big, (small,) = tr.receive(p)
        assert torch.equal(big, torch.full((n,), float(i), dtype=torch.float64))
        assert torch.equal(small, torch.full((10,), float(i + 1), dtype=torch.float64))
    ex.close()


def test_values_without_tensors_or_bytes_need_no_copy(copies):
    ex = Executor(2)
    tr = xfer.Transfer(ex, ["cpu", "cpu"])
    for value in (None, (1, "a"), {"e": torch.empty(0, 3, dtype=torch.int32)}):
        parcel = tr.send(value, 1, 0)
        assert parcel.event is None and parcel.copies == 0
        out = tr.receive(parcel)
        if isinstance(value, dict):
            assert out["e"].shape == (0, 3) and out["e"].dtype == torch.int32
        else:
            assert out == value
    assert copies == []
    ex.close()


def test_drain_waits_for_unreceived_copies():
    ex = Executor(2)
    tr = xfer.Transfer(ex, ["cpu", "cpu"])
    src = torch.arange(1 << 18, dtype=torch.float32)
    parcel = tr.send(src, 0, 1)
    tr.drain()
    assert torch.equal(parcel.value, src)   # complete without the consumer's wait
    ex.close()


def test_transfer_arguments():
    ex = Executor(2)
    with pytest.raises(ValueError, match="2 devices"):
        xfer.Transfer(ex, ["cpu"])
    tr = xfer.Transfer(ex, ["cpu", "cpu"])
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        tr.send(torch.ones(2), 0, 2)
    with pytest.raises(ValueError, match="'auto', 'copy', 'direct'"):
        xfer.check_mode("peer")
    cpu, c0, c1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert xfer.uses_copy("copy", 0, 1, cpu, cpu) and not xfer.uses_copy("copy", 1, 1, cpu, cpu)
    assert not xfer.uses_copy("auto", 0, 1, cpu, cpu) and not xfer.uses_copy("direct", 0, 1, c0, c1)
    assert xfer.uses_copy("auto", 0, 1, c0, c1) and not xfer.uses_copy("auto", 0, 1, c0, c0)
    ex.close()


# -- in the pipeline ----------------------------------------------------------------------
CASES = [(s, p) for s in ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1") for p in (2, 3)]


@pytest.mark.parametrize("name", ["mlp", "transformer"])
@pytest.mark.parametrize("schedule,p", CASES)
def test_copy_path_matches_unsplit(name, schedule, p, copies):
    m = 4 if p == 2 else 3         # interleaved needs m % p == 0; 8 samples split 3, 3, 2
    kwargs = {"num_chunks": 2} if schedule == "interleaved-1f1b" else {}
    ref_loss, ref_grads = _tp.reference(name, torch.float64)
    model, x, y, loss_fn = _tp.make(name, torch.float64)
    pipe = Pipeline(model, p, schedule=schedule, num_microbatches=m, loss_fn=loss_fn,
                    transfer="copy", **kwargs)
    loss = pipe.step(x, y)
    assert abs(loss.item() - ref_loss.item()) <= 1e-10 * abs(ref_loss.item())
    for (pname, param), g in zip(model.named_parameters(), ref_grads):
        err = (param.grad - g).norm() / g.norm().clamp_min(1e-30)
        assert err <= 1e-10, f"{pname}: relative error {err:.3g}"
    # Every boundary crossed through the copy stream: per micro-batch, forward the value's
    # tensors (mlp: hidden; transformer: hidden, mask, positions), backward the gradients
    # (hidden only: bool and int inputs have none), on the device pairs of the stage chain.
    per_mb = {"mlp": (1, 1), "transformer": (3, 1)}[name]
    s = pipe.schedule
    expect = collections.Counter()
    for k in range(s.num_stages - 1):
        a, b = s.device_of(k), s.device_of(k + 1)
        expect[(a, b)] += per_mb[0] * m
        expect[(b, a)] += per_mb[1] * m
    assert collections.Counter(c[:2] for c in copies) == expect
    assert all(t.transfer.pending == 0 for t in pipe.runner.transports.values()
               if hasattr(t, "transfer"))
    pipe.close()


def _probe(monkeypatch):
    """Record the data pointers of every stage's forward inputs and outputs."""
    seen = {}
    original = Stage.forward

    def forward(self, mb, inputs, *args, **kwargs):
        out = original(self, mb, inputs, *args, **kwargs)
        ptrs = lambda v: [t.data_ptr() for t in _leaves(v) if isinstance(t, torch.Tensor)]
        seen[(self.index, mb)] = (ptrs(inputs), ptrs(out))
        return out

    monkeypatch.setattr(Stage, "forward", forward)
    return seen


@pytest.mark.parametrize("mode", ["copy", "direct", "auto"])
def test_consumer_gets_copies_not_the_producers_tensors(mode, monkeypatch, copies):
    seen = _probe(monkeypatch)
    model, x, y, loss_fn = _tp.make("transformer", torch.float64)
    pipe = Pipeline(model, 3, schedule="1f1b", num_microbatches=2, loss_fn=loss_fn, transfer=mode)
    pipe.step(x, y)
    for k in (1, 2):
        for mb in range(2):
            inputs, produced = seen[(k, mb)][0], seen[(k - 1, mb)][1]
            assert len(inputs) == len(produced) == 3
            if mode == "copy":
                assert not set(inputs) & set(produced)
            else:   # on CPU "auto" hands over directly, as "direct" does: the same memory
                assert inputs == produced
    assert len(copies) == (2 * 2 * (3 + 1) if mode == "copy" else 0)
    pipe.close()


def test_failed_step_with_copies_in_flight_recovers():
    class Fail(nn.Module):
        armed = True

        def forward(self, h):
            if Fail.armed:
                raise ArithmeticError("boom")
            return h

    ref_loss, ref_grads = _tp.reference("mlp", torch.float64)
    model, x, y, loss_fn = _tp.make("mlp", torch.float64)
    layers = list(model)
    pipe = Pipeline(layers[:6] + [Fail()] + layers[6:], 3, schedule="1f1b", balance=[3, 3, 3],
                    num_microbatches=4, loss_fn=loss_fn, transfer="copy")
    with pytest.raises(Exception, match="boom"):
        pipe.step(x, y)
    Fail.armed = False
    model.zero_grad()
    loss = pipe.step(x, y)
    assert abs(loss.item() - ref_loss.item()) <= 1e-10 * abs(ref_loss.item())
    for param, g in zip(model.parameters(), ref_grads):
        assert (param.grad - g).norm() <= 1e-10 * g.norm()
    pipe.close()


def test_bad_transfer_argument():
    model, x, y, loss_fn = _tp.make("mlp", torch.float64)
    with pytest.raises(ValueError, match="transfer must be one of 'auto', 'copy', 'direct'"):
        Pipeline(model, 2, loss_fn=loss_fn, transfer="peer")


# -- CUDA ---------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not cuda_backend_available(),
                    reason="needs two CUDA devices and the CUDA backend (pipetrain._C_cuda)")
@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_cuda_1f1b_across_two_gpus_matches_unsplit(name, copies):
    ref_loss, ref_grads = _tp.reference(name, torch.float64)   # on CPU
    model, x, y, loss_fn = _tp.make(name, torch.float64)
    pipe = Pipeline(model, 2, schedule="1f1b", num_microbatches=4, loss_fn=loss_fn,
                    devices=["cuda:0", "cuda:1"], transfer="copy")
    x = tuple(t.to("cuda:0") for t in x) if isinstance(x, tuple) else x.to("cuda:0")
    loss = pipe.step(x, y.to("cuda:1"))
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    # fp64 on the GPU: reductions are ordered differently from the CPU's, still ~1e-15.
    assert abs(loss.item() - ref_loss.item()) <= 1e-10 * abs(ref_loss.item())
    for (pname, param), g in zip(model.named_parameters(), ref_grads):
        err = (param.grad.cpu() - g).norm() / g.norm().clamp_min(1e-30)
        assert err <= 1e-10, f"{pname}: relative error {err:.3g}"
    data = [c for c in copies if c[2] > 0]     # zero-byte copies are the destination fences
    per_mb = 4 if name == "transformer" else 2
    assert len(data) == 4 * per_mb
    assert {c[:2] for c in data} == {(0, 1), (1, 0)}
    pipe.close()

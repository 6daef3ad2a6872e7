"""The wire's two planes across 2 gloo processes (pipetrain.distributed.wire, mesh.P2PGroups):
headers and descriptions travel on the control group, packed tensors on the data group (one
per edge when asked, as under NCCL); values with changing structure, shapes and dtypes arrive
equal; a peer's error reaches a receiver that has a packed receive posted."""

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from tests.distributed.pool import module_pool  # noqa: E402

PARTS = ("header", "meta", "data", "resized")


def _values():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64)
    return [a, a * 2,                                                    # unchanged: data tag
            (torch.randn(5, generator=g), {"i": torch.arange(4).view(2, 2), "k": 7}),   # changed
            (torch.randn(5, generator=g), {"i": torch.arange(4, 8).view(2, 2), "k": 7}),
            torch.randn(2, 3, generator=g).t(),                          # not contiguous
            torch.zeros(0), "a plain value"]                             # no tensor bytes


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def exchange(separate: bool, per_edge: bool) -> dict:
    """Rank 0 sends the values of :func:`_values` then an error on edge 3; rank 1 receives."""
    import time

    from pipetrain.distributed import wire
    from pipetrain.distributed.mesh import Mesh, P2PGroups
    from pipetrain.mailbox import VALUE

    mesh = Mesh(2)
    groups = P2PGroups(mesh, [(3, 0, 1)], timeout=20, separate=separate, per_edge=per_edge)
    seen = []
    real = wire.dist

    class Recorder:
        def __getattr__(self, name):
            return getattr(real, name)

        def isend(self, t, dst, tag, group):
            seen.append((PARTS[tag % 4], "ctrl" if group is groups.ctrl else
                         "data" if group is groups.data(3) else "other"))
            return real.isend(t, dst=dst, tag=tag, group=group)

        irecv = None

    rec = Recorder()
    rec.irecv = lambda t, src, tag, group: (seen.append((PARTS[tag % 4], "ctrl" if group is groups.ctrl
                                                         else "data" if group is groups.data(3) else "other")),
                                            real.irecv(t, src=src, tag=tag, group=group))[1]
    wire.dist = rec
    values = _values()
    stream = wire.Stream(3, VALUE, 1 - mesh.rank, torch.device("cpu"), "0->1", groups)
    out = {"split": groups.ctrl is not groups.data(3), "per_edge": groups.data(3) is not groups.shared,
           "data_is_ctrl": groups.data(3) is groups.ctrl}
    try:
        if mesh.rank == 0:
            stream.begin_run()
            works, keep = [], []
            for v in values:
                w, k = stream.send(v)
                works += w
                keep += k
            w, k = stream.send_error("rank 0: stage 0 raised ValueError: boom")
            works += w
            keep += k
            wire.wait_all(works, deadline=time.monotonic() + 20, board=wire.Board(None, "t"),
                          peer=1, me=0, what="sends")
        else:
            stream.begin_run(len(values) + 1)
            stream.post()
            out["equal"] = [_same(v, stream.take(me=1, what=f"message {i}"))
                            for i, v in enumerate(values)]
            try:
                stream.take(me=1, what="the last message")
                out["error"] = None
            except wire.PeerFailed as err:
                out["error"] = str(err)
    finally:
        wire.dist = real
    out["planes"] = sorted(set(seen))
    return out


pool = module_pool(2)


@pytest.mark.parametrize("separate,per_edge", [(True, False), (True, True), (False, False)])
def test_control_and_data_planes(pool, separate, per_edge):
    sender, receiver = pool.run("tests.distributed.test_wire", "exchange", 2, separate=separate,
                                per_edge=per_edge)
    for r in (sender, receiver):
        assert r["split"] == (separate or per_edge) and r["per_edge"] == per_edge
        if separate:
            # Headers and descriptions only on the control group, packed tensors only on data.
            assert r["planes"] == sorted({("data", "data"), ("resized", "data"),
                                          ("header", "ctrl"), ("meta", "ctrl")}), r
        else:     # gloo's default: one group, the planes told apart by tag
            assert r["data_is_ctrl"] and r["planes"] == sorted(
                {(part, "ctrl") for part in PARTS}), r
    assert receiver["equal"] == [True] * len(_values()), receiver
    assert receiver["error"] is not None and "boom" in receiver["error"], receiver

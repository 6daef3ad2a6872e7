"""The same-host shared-memory wire (pipetrain.distributed.shm_wire) between gloo processes
on 127.0.0.1: whole pipelines through it equal the unsplit model (fp64: only summation order
differs, so 1e-10), messages of every shape / dtype / structure arrive exactly, errors and
dead peers are reported within the timeout, and no /dev/shm name outlives its use."""

import os

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not os.path.isdir("/dev/shm"):
    pytest.skip("torch.distributed or /dev/shm is not available", allow_module_level=True)

from tests.distributed.killed import launch  # noqa: E402
from tests.distributed.pool import module_pool  # noqa: E402

S = "tests.distributed.scenarios"
W = "tests.distributed.shm_scenarios"
TOL = 1e-10

pool = module_pool(3)


# Every synchronous schedule on 2 and 3 processes through shared memory, batch sizes that
# change between steps and uneven micro-batches (11 rows over m).
CASES = [("gpipe", 2, 4), ("1f1b", 3, 4), ("interleaved-1f1b", 2, 4), ("zb-h1", 3, 4),
         ("zb-h2", 2, 5), ("zb-h1-bw", 3, 5), ("zb-h2-bw", 2, 4), ("interleaved-1f1b", 3, 6)]


@pytest.mark.parametrize("schedule,p,m", CASES)
def test_schedule_through_shm_equals_unsplit(pool, schedule, p, m):
    res = pool.run(S, "train", p, schedule=schedule, p=p, m=m, wire="shm")
    for r, out in enumerate(res):
        assert out["wires"] == ["ShmStream"], out["wires"]
        for err in out["errs"]:
            assert err["params"] > 0
            assert err["loss"] < TOL and err["grad"] < TOL, (r, err)


def test_auto_picks_shm_between_cpu_ranks_of_one_host(pool):
    res = pool.run(S, "train", 2, schedule="1f1b", p=2, m=2, sizes=(4,))
    assert all(out["wires"] == ["ShmStream"] for out in res)


def test_gloo_wire_still_equals_unsplit(pool):
    """The opt-out: the same pipeline on gloo point-to-point messages."""
    res = pool.run(S, "train", 2, schedule="1f1b", p=2, m=4, wire="gloo", tied=True)
    for out in res:
        assert out["wires"] == ["Stream"], out["wires"]
        for err in out["errs"]:
            assert err["loss"] < TOL and err["grad"] < TOL, err


def test_messages_of_changing_shape_dtype_structure_and_size_arrive_exactly(pool):
    # 6 slots for 18 messages a run: the sender waits for free slots; several values are
    # larger than a slot's first size, so slots grow (and the receiver remaps them).
    res = pool.run(W, "exchange", 2, n=18, runs=3, slots=6)
    assert res[1]["bad"] == []
    # Descriptors per stream: the segment, the FIFO, and one per mapping (Python's mmap
    # keeps a duplicate): the control pages and each arena, not each slot (a descriptor per
    # slot ran a bench with m = 64 out of select()'s 1024).
    assert res[0]["fds"] == res[1]["fds"] == 3
    for out in res:
        assert out["fds_run"] == 3 + out["arenas"] and 1 <= out["arenas"] < 6, out
    assert res[0]["fds_after_close"] == res[1]["fds_after_close"] == []
    assert res[0]["count"] == res[1]["count"] == 54
    for out in res:
        assert out["after_connect"] == [] and out["after_close"] == [], out


def test_error_from_peer_names_rank_and_action(pool):
    res = pool.run(W, "error_delivered", 2)
    recv = res[1]
    assert recv["first"] == [1.0, 1.0, 1.0]
    assert "rank 0: 0B3 failed" in recv["error"] and "broken on purpose" in recv["error"], recv
    assert "1RF1 from rank 0" in recv["error"]
    assert recv["seconds"] < 5
    assert res[0]["after_close"] == [] and res[1]["after_close"] == []


def test_stage_exception_reaches_every_rank_through_shm_and_leaves_no_shm(pool):
    res = pool.run(W, "fail_and_list", 3, p=3, bad_rank=1)
    for r in res:
        assert r["error"] is not None and "rank 1" in r["error"] and "boom" in r["error"], r
        assert "(1F0)" in r["error"], r          # the failing action
        assert r["seconds"] < 20, r
        assert r["left"] == [], r


def test_sequence_mismatch_is_reported(pool):
    res = pool.run(W, "seq_mismatch", 2)
    assert "sent message 5" in res[1]["error"] and "schedules disagree" in res[1]["error"]


def test_silent_peer_times_out_naming_it(pool):
    res = pool.run(W, "silent_peer", 2, wait_s=1.0)
    assert "rank 0 stopped answering" in res[1]["error"] and "past the timeout" in res[1]["error"]
    assert 1.0 <= res[1]["seconds"] < 5


def test_bad_wire_value_is_refused():
    import pipetrain
    with pytest.raises(ValueError, match="wire must be one of"):
        pipetrain.Pipeline([torch.nn.Linear(2, 2)], num_devices=1, loss_fn=lambda a, b: a.sum(),
                           wire="nccl")


def test_killed_peer_detected_within_timeout_and_no_shm_left(tmp_path):
    """A rank SIGKILLed mid-step on the shm wire: the survivors raise naming it well within
    the pipeline's 30 s timeout, and no /dev/shm name of any of the three processes is left."""
    world, kill = 3, 1
    procs, results = launch(tmp_path, world, kill, WIRE="shm")
    assert sorted(results) == [r for r in range(world) if r != kill]
    for res in results.values():
        assert res["error"] is not None and f"rank {kill}" in res["error"], res
        assert res["seconds"] < 15, res
    left = [n for n in os.listdir("/dev/shm")
            if any(n.startswith(f"pipetrain-{pr.pid}-") for pr in procs)]
    assert left == []

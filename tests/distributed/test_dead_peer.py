"""A rank killed mid-step (SIGKILL): the others raise PipelineError naming it, in well under
the 60 s default, and no process is left behind. Ranks are launched directly with env://
(torchrun would kill everyone when one dies): :func:`tests.distributed.killed.launch`."""

from tests.distributed.killed import launch


def test_killed_rank_is_named_by_the_survivors(tmp_path):
    world, kill = 3, 1
    procs, results = launch(tmp_path, world, kill)
    assert sorted(results) == [r for r in range(world) if r != kill]
    for res in results.values():
        assert res["error"] is not None and f"rank {kill}" in res["error"], res
        assert res["seconds"] < 60, res

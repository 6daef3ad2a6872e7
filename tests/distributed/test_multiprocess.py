"""Multi-process pipelines on gloo (127.0.0.1): every number is checked against the unsplit
model computed in the same process. One pool of 4 worker processes serves the whole module;
every task is bounded in time and the pool is killed at the end (also on failure)."""

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from tests.distributed.pool import module_pool  # noqa: E402

S = "tests.distributed.scenarios"
TOL = 1e-10


pool = module_pool(4)


def _check(results, world, clip=False):
    assert len(results) == world
    for r, res in enumerate(results):
        assert res["params"] if "params" in res else True
        for err in res["errs"]:
            assert err["loss"] < TOL and err["grad"] < TOL, (r, err)
            assert err["params"] > 0
            if clip:
                assert err["norm"] < TOL, (r, err)


# Every synchronous schedule, p in {2, 3, 4}; m < p and m not a multiple of p among them.
CASES = [("gpipe", 2, 4), ("1f1b", 3, 4), ("interleaved-1f1b", 2, 4), ("zb-h1", 4, 4),
         ("zb-h2", 3, 5), ("1f1b", 4, 2), ("gpipe", 3, 2), ("zb-h1", 2, 3), ("zb-h2", 4, 6),
         ("interleaved-1f1b", 3, 6), ("zb-h1-bw", 3, 5), ("zb-h2-bw", 2, 4)]


@pytest.mark.parametrize("schedule,p,m", CASES)
def test_schedule_equals_unsplit(pool, schedule, p, m):
    res = pool.run(S, "train", p, schedule=schedule, p=p, m=m)
    _check(res, p)
    assert sorted(r["pp_rank"] for r in res) == list(range(p))


@pytest.mark.parametrize("p", [2, 3])
def test_tied_clip_token_level(pool, p):
    res = pool.run(S, "train", p, schedule="1f1b", p=p, m=3, tied=True, clip=True, token=True)
    _check(res, p, clip=True)


def test_data_parallel_2x2_equals_unsplit_on_combined_batch(pool):
    res = pool.run(S, "train", 4, schedule="1f1b", p=2, m=2, data_parallel=2, tied=True)
    _check(res, 4)
    assert sorted((r["dp_rank"], r["pp_rank"]) for r in res) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_stage_exception_reaches_every_rank(pool):
    res = pool.run(S, "fail_in_stage", 3, p=3, bad_rank=1)
    for r in res:
        assert r["error"] is not None and "rank 1" in r["error"] and "boom" in r["error"], r
        assert r["seconds"] < 10
    assert "stage 1" in res[1]["error"] and "micro-batch 0" in res[1]["error"]


def test_ranks_that_disagree_fail_at_construction(pool):
    res = pool.run(S, "disagree", 2, p=2)
    for r in res:
        assert r["error"] is not None and "rank 1" in r["error"] and "num_microbatches" in r["error"]


def test_checkpoint_resume_bit_identical_and_resplit(pool, tmp_path):
    path = str(tmp_path / "ckpt")
    saved = pool.run(S, "resume", 2, phase="save", p=2, path=path)
    # A fresh process group, fresh model and optimizer (a restarted job): same losses, bit for bit.
    again = pool.run(S, "resume", 2, phase="load", p=2, path=path)
    assert [r["losses"] for r in again] == [r["losses"] for r in saved]
    # A different split (p = 3) resumes with the same losses up to reduction order.
    resplit = pool.run(S, "resume", 3, phase="load", p=3, path=path)
    for r in resplit:
        assert r["losses"] == pytest.approx(saved[0]["losses"], abs=1e-12)
    # The plain single-process model loads it and computes the saved model's next loss.
    import pipetrain
    from tests.distributed import scenarios as sc
    plain = sc.model(5, False)
    with torch.no_grad():
        for prm in plain.parameters():
            prm.zero_()
    pipetrain.load_checkpoint(plain, path)
    net = sc.model(5, False)
    pipe = pipetrain.Pipeline(net, num_devices=2, schedule="1f1b", num_microbatches=4, loss_fn=sc.mse)
    pipetrain.load_checkpoint(pipe, path)
    for (k, a), b in zip(plain.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), k
    x, y = sc.batch(8, 2, False)
    assert float(sc.mse(plain(x), y).detach()) == pytest.approx(saved[0]["losses"][0], abs=1e-12)
    pipe.close()


@pytest.mark.parametrize("schedule,p,token", [("1f1b", 3, False), ("interleaved-1f1b", 2, True)])
def test_eval_forward_only_equals_unsplit(pool, schedule, p, token):
    res = pool.run(S, "evaluate", p, p=p, schedule=schedule, token=token)
    for r in res:
        assert r["loss"] < TOL, r
    last = [r for r in res if r["out"] is not None]
    assert len(last) == 1 and last[0]["out"] < TOL and last[0]["only"] < TOL


def test_schedule_that_cannot_run_m_fails_clearly_on_every_rank(pool):
    for r in pool.run(S, "bad_schedule", 2, p=2):
        assert r["error"] is not None and "multiple" in r["error"], r


def test_nonfinite_gradient_on_one_rank_skips_the_step_on_all(pool):
    for r in pool.run(S, "nonfinite", 3, p=3):
        assert r == {"found_inf": True, "committed": False}, r


def test_meta_model_materializes_only_local_stages(pool):
    for r in pool.run(S, "meta_init", 2, p=2):
        assert not r["local_meta"] and r["others_meta"] and r["num_local"] > 0, r
        assert r["loss"] < 1e-5, r

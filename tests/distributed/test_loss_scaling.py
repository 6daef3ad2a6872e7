"""Loss scaling across processes (gloo, 127.0.0.1): an infinite gradient on one rank skips the
step on every rank (pipeline and data-parallel groups), the scale halves and grows alike
everywhere, and clean steps equal the unsplit model's (unscaled) in fp64. One pool of 4
worker processes; every task bounded in time."""

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from tests.distributed.pool import module_pool  # noqa: E402

S = "tests.distributed.scenarios"


pool = module_pool(4)


@pytest.mark.parametrize("p,dp,poison", [(3, None, 1), (2, 2, 3)])
def test_inf_on_one_rank_skips_everywhere_and_scale_agrees(pool, p, dp, poison):
    world = p * (dp or 1)
    res = pool.run(S, "loss_scaled", world, p=p, poison_rank=poison, data_parallel=dp)
    for r in res:
        steps = r["steps"]
        assert [s["found_inf"] for s in steps] == [False, True, False, False], r
        assert [s["stepped"] for s in steps] == [True, False, True, True], r
        assert [s["committed"] for s in steps] == [True, False, True, True], r
        # 2**16, a clean step, halved by the inf, two clean steps: grown back.
        assert [s["scale"] for s in steps] == [2.0 ** 16, 2.0 ** 15, 2.0 ** 15, 2.0 ** 16], r
        for s in steps:
            assert s["loss"] < 1e-10, r
            if s["committed"]:
                assert s["grad"] < 1e-10, r

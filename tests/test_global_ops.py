"""In one process: token-level losses, tied weights and clip_grad_norm_ against the unsplit model."""

import copy

import pytest
import torch

import pipetrain
from tests.distributed import scenarios as sc


@pytest.mark.parametrize("schedule,m", [("1f1b", 3), ("zb-h1", 4), ("gpipe", 5)])
def test_token_level_tied_clip_equal_unsplit(schedule, m):
    net = sc.model(3, tied=True)
    ref = copy.deepcopy(net)
    pipe = pipetrain.Pipeline(net, num_devices=2, schedule=schedule, num_microbatches=m,
                              loss_fn=sc.masked)
    for step, n in enumerate((9, 12)):        # uneven micro-batches, changing batch size
        x, y = sc.batch(n, step, token=True)
        y["mask"][: n // 2] = 0.0              # micro-batches hold different token counts
        y["mask"][0] = 1.0
        loss = pipe.step(x, y)
        total = pipe.clip_grad_norm_(0.05)
        ref.zero_grad()
        s, c = sc.masked(ref(x), y)
        (s / c).backward()
        ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        assert abs(float(loss) - float((s / c).detach())) < 1e-12
        assert abs(float(total) - float(ref_total)) < 1e-12
        for (name, a), b in zip(net.named_parameters(), ref.parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-12, rtol=0), name
        net.zero_grad()
    pipe.close()


def test_token_level_zero_count_is_a_clear_error():
    net = sc.model(1, tied=False)
    pipe = pipetrain.Pipeline(net, num_devices=2, schedule="1f1b", num_microbatches=2,
                              loss_fn=sc.masked)
    x, y = sc.batch(4, 0, token=True)
    y["mask"].zero_()
    with pytest.raises(ValueError, match="counted 0"):
        pipe.step(x, y)
    pipe.close()


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-1f1b"])
def test_eval_in_one_process(schedule):
    net = sc.model(4, tied=False)
    ref = copy.deepcopy(net)
    pipe = pipetrain.Pipeline(net, num_devices=2, schedule=schedule, num_microbatches=4,
                              loss_fn=sc.mse)
    x, y = sc.batch(7, 3, token=False)
    out, loss = pipe.eval(x, y)
    with torch.no_grad():
        r = ref(x)
    assert torch.allclose(out, r, atol=1e-13, rtol=0)
    assert abs(float(loss) - float(sc.mse(r, y))) < 1e-13
    assert all(p.grad is None for p in net.parameters())   # nothing ran backward
    assert torch.allclose(pipe.eval(x), r, atol=1e-13, rtol=0)
    pipe.close()

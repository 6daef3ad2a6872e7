"""StageRun (pipetrain.stage_run): the meters and the staged-gradient fast path."""

import torch
from torch import nn

from pipetrain.stage import Stage
from pipetrain.stage_run import Meter, StageRun


def test_meter_tracks_peaks_of_each_quantity():
    m = Meter()
    m.add(10, 1)
    m.add(5, 1, 7)
    m.add(-15, -2)
    m.add(3, 0, -7)
    assert (m.bytes, m.count, m.w_bytes) == (3, 0, 0)
    assert (m.peak_bytes, m.peak_count, m.peak_w_bytes) == (15, 2, 7)


def _grads(seed, params):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def test_dense_fast_path_sums_like_the_dict_and_survives_commits_and_replacements():
    """Once every parameter has a staged gradient, accumulate is one _foreach_add_ into the
    tensors it remembered. A commit (what a U action does mid-run) empties the dict and a
    caller of staged_grads() may replace entries: both must make it look them up again, or
    later gradients would go into tensors no longer staged. Reference: plain sums."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    st = Stage(0, [layer])
    params = st.params
    st.begin_run(Meter())
    run = st._run
    run.accumulate(params, _grads(1, params), cache=True)
    run.accumulate(params, _grads(2, params), cache=True)
    assert run._dense is not None
    want = [a + b for a, b in zip(_grads(1, params), _grads(2, params))]
    for p, w in zip(params, want):
        torch.testing.assert_close(st.staged_grads()[p], w, rtol=0, atol=0)
    # a caller replaces an entry (as the data-parallel reduction does): later sums go there
    staged = st.staged_grads()
    staged[params[0]] = staged[params[0]].clone()
    run.accumulate(params, _grads(3, params), cache=True)
    torch.testing.assert_close(staged[params[0]], want[0] + _grads(3, params)[0], rtol=0, atol=1e-15)
    # a commit mid-run (U): p.grad gets the sum so far, the run stages afresh
    st.commit_grads()
    committed = [p.grad.clone() for p in params]
    run.accumulate(params, _grads(4, params), cache=True)
    run.accumulate(params, _grads(5, params), cache=True)
    for p, c in zip(params, committed):
        assert torch.equal(p.grad, c)                       # untouched until the next commit
    st.end_run(commit=True)
    for p, c, a, b in zip(params, committed, _grads(4, params), _grads(5, params)):
        torch.testing.assert_close(p.grad, c + a + b, rtol=0, atol=1e-15)


def test_dense_fast_path_takes_the_general_way_for_a_missing_gradient():
    layer = nn.Linear(3, 2).double()
    params = list(layer.parameters())
    run = StageRun(Meter(), staged=True)
    run.accumulate(params, _grads(1, params), cache=True)
    run.accumulate(params, _grads(2, params), cache=True)
    g3 = _grads(3, params)
    run.accumulate(params, [g3[0], None], cache=True)       # bias not reached this time
    want = [a + b for a, b in zip(_grads(1, params), _grads(2, params))]
    torch.testing.assert_close(run.staged[params[0]], want[0] + g3[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(run.staged[params[1]], want[1], rtol=0, atol=0)


def test_a_stage_without_parameters_accumulates_nothing():
    """A stage of parameter-free layers (its backward still runs, for the input gradient)
    passes an empty list every time: no fast path to take, and no error."""
    run = StageRun(Meter(), staged=True)
    for _ in range(3):
        run.accumulate([], (), cache=True)
    assert run.staged == {} and run._dense is None
    st = Stage(0, [nn.GELU()])
    st.begin_run(Meter())
    x = torch.randn(2, 3, dtype=torch.float64)
    for k in range(3):
        st.forward(k, x)
        g = st.backward(k, torch.ones(2, 3, dtype=torch.float64))
        want = torch.autograd.functional.vjp(nn.functional.gelu, x, torch.ones_like(x))[1]
        torch.testing.assert_close(g, want, rtol=1e-12, atol=0)
    st.end_run(commit=True)

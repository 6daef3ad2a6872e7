"""The hand-written I (pipetrain.manual_backward) against autograd on the unsplit model.

Each case runs a stage's F, I and W per micro-batch and compares, per micro-batch, the
gradient w.r.t. the stage input and, after all W's, every parameter gradient with
``torch.autograd`` on the same layers (the independent reference). In float64 the
hand-written part calls the kernels autograd's nodes call, on the same saved tensors, so
the only differences are the order of sums (a bias's row sum, two Linear uses of one
weight, the stacked rows of a batched W): 1e-10 relative is ~10^5 ulps of margin for
that, while a missing or doubled term (a micro-batch, a path, a residual) changes
gradients by O(1) relative. Failures name the stage and the micro-batch.
"""

import pytest
import torch
from torch import nn

import pipetrain
from pipetrain import manual_backward as manual
from pipetrain import split_backward as split
from pipetrain.stage import Stage
from tests.models import assert_grads, reference
from tests.test_split_backward import ScaleLayer

F64 = torch.float64


class Residual(nn.Module):
    """Pre-norm residual MLP block: x + fc2(act(fc1(ln(x)))) (AddBackward0 with fan-out)."""

    def __init__(self, d, act=nn.GELU):
        super().__init__()
        self.ln, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), act(), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


class Param(nn.Module):
    """A parameter used by an elementwise op (not a Linear): the hand-written part stops."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.s


class Tied(nn.Module):
    """One Linear applied twice along the chain (its weight on both sides of the split)."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class Rows3d(nn.Module):
    """A Linear on a 3-D view: ViewBackward0 around the AddmmBackward0."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d // 2, d // 2)

    def forward(self, x):
        return self.lin(x.view(x.shape[0], 2, -1)).reshape(x.shape[0], -1)


def _models(d=6):
    """name -> (layers, every node hand-written?)"""
    return {
        "linear-gelu": ([nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.GELU()], True),
        "activations": ([nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d, bias=False), nn.SiLU(),
                         nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d), nn.Sigmoid(),
                         nn.Linear(d, d), nn.GELU(approximate="tanh")], True),
        "residual": ([Residual(d), Residual(d, nn.ReLU), nn.LayerNorm(d, elementwise_affine=False)],
                     True),
        "3d-view": ([nn.Linear(d, d), Rows3d(d), nn.Tanh()], True),
        "tied": ([Tied(d), nn.Linear(d, d)], True),
        "custom-middle": ([nn.Linear(d, d), nn.GELU(), ScaleLayer(d), nn.Linear(d, d), nn.Tanh()],
                          False),
        "custom-top": ([nn.Linear(d, d), nn.Tanh(), ScaleLayer(d)], False),
        "custom-bottom": ([ScaleLayer(d), nn.Linear(d, d), nn.GELU()], False),
        "param-mul": ([nn.Linear(d, d), Param(d), nn.LayerNorm(d), nn.Linear(d, d)], False),
    }


def _run_stage(layers, xs, gs, count=1, input_grad=True):
    """F and I of every micro-batch of a stand-alone stage, then its W's (``count`` per
    action). Returns (stage, per-micro-batch input gradients)."""
    stage = Stage(0, layers, input_grad=input_grad)
    grads_in = []
    for k, x in enumerate(xs):
        stage.forward(k, x)
    for k, g in enumerate(gs):
        grads_in.append(stage.backward_input(k, g))
    for k in range(0, len(xs), count):
        stage.backward_weight(k, count)
    return stage, grads_in


def _autograd(layers, xs, gs):
    """The reference: input gradients per micro-batch and summed parameter gradients."""
    model = nn.Sequential(*layers)
    model.zero_grad()
    grads_in = []
    for x, g in zip(xs, gs):
        x = x.clone().requires_grad_()
        model(x).backward(g)
        grads_in.append(x.grad)
    out = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads_in, out


def _check(name, stage_index, got_in, want_in, params, want_params, rtol=1e-10, atol=1e-12):
    for k, (a, b) in enumerate(zip(got_in, want_in)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol,
                                   msg=lambda m: f"{name}: stage {stage_index} micro-batch {k} "
                                                 f"input gradient: {m}")
    for i, (p, b) in enumerate(zip(params, want_params)):
        if b is None:
            assert p.grad is None, f"{name}: stage {stage_index} parameter {i} got a gradient"
            continue
        torch.testing.assert_close(p.grad, b, rtol=rtol, atol=atol,
                                   msg=lambda m: f"{name}: stage {stage_index} parameter {i} "
                                                 f"(shape {tuple(p.shape)}): {m}")


def _data(n, rows, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(rows, d, dtype=F64, generator=g) for _ in range(n)],
            [torch.randn(rows, d, dtype=F64, generator=g) for _ in range(n)])


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("name", list(_models()))
def test_stage_equals_autograd_fp64(name, count):
    torch.manual_seed(0)
    layers, all_hand = _models()[name]
    layers = [m.double() for m in layers]
    xs, gs = _data(3, 4, 6)
    want_in, want_params = _autograd(layers, xs, gs)
    stage, got_in = _run_stage(layers, xs, gs, count=count)
    params = [p for m in layers for p in m.parameters()]
    params = list({id(p): p for p in params}.values())
    _check(name, 0, got_in, want_in, params, want_params)
    # The hand-written part ran (and, for mixed models, handed the rest to autograd).
    progs = [v for k, v in split._PROGRAMS[stage].items() if k != "run"]
    if name == "custom-top":
        assert progs == [None]          # nothing hand-written at the top: the autograd split
    else:
        assert len(progs) == 1 and progs[0] is not None and progs[0].steps
        assert (not progs[0].rest and not progs[0].outside) == all_hand


def test_hand_written_w_needs_no_autograd(monkeypatch):
    # Linears, activations, residuals and LayerNorms: I and W never call autograd.
    torch.manual_seed(0)
    layers = [Residual(6).double(), nn.Linear(6, 6).double(), nn.Tanh()]
    xs, gs = _data(4, 3, 6)
    want_in, want_params = _autograd(layers, xs, gs)

    def no_autograd(*a, **k):
        raise AssertionError("the hand-written path called autograd")

    monkeypatch.setattr(split, "fast_grad", no_autograd)
    stage, got_in = _run_stage(layers, xs, gs, count=2)
    _check("no-autograd", 0, got_in, want_in, [p for m in layers for p in m.parameters()],
           want_params)


def test_frozen_weight_and_bias():
    torch.manual_seed(0)
    layers = [nn.Linear(6, 6).double(), nn.GELU(), nn.Linear(6, 6).double(),
              nn.LayerNorm(6).double()]
    layers[0].weight.requires_grad_(False)
    layers[2].bias.requires_grad_(False)
    layers[3].weight.requires_grad_(False)
    xs, gs = _data(3, 2, 6)
    want_in, want_params = _autograd(layers, xs, gs)
    stage, got_in = _run_stage(layers, xs, gs)
    _check("frozen", 0, got_in, want_in, [p for m in layers for p in m.parameters()], want_params)


def test_control_flow_recompiles():
    # Two graph shapes under one input signature: the replay notices and recompiles.
    torch.manual_seed(0)

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            return torch.tanh(self.a(x)) if x.sum() > 0 else torch.relu(self.b(self.a(x)))

    layers = [Branch().double(), nn.Linear(6, 6).double()]
    xs, gs = _data(6, 3, 6)
    xs = [x if k % 2 else -x.abs() for k, x in enumerate(xs)]
    xs = [x.abs() if k % 2 else x for k, x in enumerate(xs)]
    want_in, want_params = _autograd(layers, xs, gs)
    _, got_in = _run_stage(layers, xs, gs)
    _check("branch", 0, got_in, want_in, [p for m in layers for p in m.parameters()], want_params)


def test_module_hooks_turn_the_hand_written_path_off():
    # A forward hook may hook the activation it sees; only autograd would call that hook.
    torch.manual_seed(0)
    layers = [nn.Linear(6, 6).double(), nn.GELU(), nn.Linear(6, 6).double()]
    seen = []
    def hook(module, inputs, out):
        out.register_hook(seen.append)      # returns None: the output is left as it is

    layers[1].register_forward_hook(hook)
    xs, gs = _data(2, 3, 6)
    want_in, want_params = _autograd(layers, xs, gs)
    n_ref = len(seen)
    stage, got_in = _run_stage(layers, xs, gs)
    assert len(seen) == 2 * n_ref == 4
    assert split._PROGRAMS[stage]["run"][1] is False
    _check("hooked", 0, got_in, want_in, [p for m in layers for p in m.parameters()], want_params)


def test_lever_off_is_the_autograd_split(monkeypatch):
    monkeypatch.setattr(manual, "ENABLED", False)
    torch.manual_seed(0)
    layers = [nn.Linear(6, 6).double(), nn.GELU()]
    xs, gs = _data(2, 3, 6)
    want_in, want_params = _autograd(layers, xs, gs)
    stage, got_in = _run_stage(layers, xs, gs)
    assert stage not in split._PROGRAMS
    _check("lever-off", 0, got_in, want_in, [p for m in layers for p in m.parameters()], want_params)


def test_sink_stage_with_mse_loss_and_a_target_needing_grad():
    # MseLossBackward0 is hand-written; a target that requires grad gets its gradient too.
    torch.manual_seed(0)
    layers = [nn.Linear(6, 6).double(), nn.Tanh()]
    loss_fn = nn.functional.mse_loss
    xs, ys = _data(3, 4, 6)
    model = nn.Sequential(*layers)
    want_in, want_t = [], []
    for x, y in zip(xs, ys):
        x = x.clone().requires_grad_()
        t = y.clone().requires_grad_()
        (loss_fn(model(x), t) / 3).backward()
        want_in.append(x.grad)
        want_t.append(t.grad)
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    stage = Stage(1, layers, loss_fn=loss_fn, input_grad=True)
    for k, (x, y) in enumerate(zip(xs, ys)):
        stage.forward(k, x, y.clone().requires_grad_(), weight=1 / 3)
    got_in, got_t = [], []
    for k in range(3):
        got_in.append(stage.backward_input(k))
        got_t.append(stage.take_target_grad(k))
    stage.backward_weight(0, 3)
    for k in range(3):
        torch.testing.assert_close(got_t[k], want_t[k], rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"stage 1 micro-batch {k} target: {m}")
    _check("mse-sink", 1, got_in, want_in, list(model.parameters()), want)
    prog = [v for k, v in split._PROGRAMS[stage].items() if k != "run"][0]
    assert prog is not None and not prog.rest


def _chain(d=6, seed=0):
    """Supported layers with an unsupported one in each half: every stage mixes both."""
    torch.manual_seed(seed)
    return nn.Sequential(Residual(d), ScaleLayer(d), nn.Linear(d, d), nn.GELU(),
                         Residual(d, nn.SiLU), Param(d), nn.Linear(d, d), nn.Tanh(),
                         nn.Linear(d, d)).double()


@pytest.mark.parametrize("schedule", ["zb-h1", "zb-h2", "zb-h1-bw", "zb-h2-bw"])
@pytest.mark.parametrize("p, m", [(2, 4), (3, 5)])
def test_split_schedules_equal_the_unsplit_model_fp64(schedule, p, m):
    model = _chain()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2 * m + 1, 6, dtype=F64, generator=g)
    y = torch.randn(2 * m + 1, 6, dtype=F64, generator=g)
    loss, grads = reference(model, x, y)
    pipe = pipetrain.Pipeline(model, num_devices=p, schedule=schedule, num_microbatches=m,
                              loss_fn=nn.functional.mse_loss)
    try:
        got = pipe.step(x, y)
    finally:
        pipe.close()
    torch.testing.assert_close(got, loss, rtol=1e-10, atol=0)
    assert_grads(model, grads, rtol=1e-10, atol=1e-12)


def test_every_stage_and_micro_batch_of_a_split_model():
    # Stages built by hand from _chain: each stage's I per micro-batch (the gradient sent
    # upstream) against autograd on that stage's layers, then its W's.
    model = _chain()
    cuts = [list(model)[:3], list(model)[3:6], list(model)[6:]]
    xs, gs = _data(4, 3, 6, seed=5)
    acts = xs
    for s, layers in enumerate(cuts):
        want_in, want_params = _autograd(layers, acts, gs)
        stage, got_in = _run_stage(layers, acts, gs, count=2 if s else 1,
                                   input_grad=s > 0)
        if s == 0:
            # The source stage: nothing to send, W is the whole backward.
            assert all(gi is None for gi in got_in)
            got_in, want_in = [], []
        _check("chain", s, got_in, want_in, [p for m in layers for p in m.parameters()],
               want_params)
        with torch.no_grad():
            acts = [nn.Sequential(*layers)(a) for a in acts]
        for m in layers:
            m.zero_grad()


def test_fp32_close_to_the_autograd_split():
    # float32: the same kernels, summation order aside; rtol 1e-5 is ~100 ulps.
    torch.manual_seed(0)
    base = nn.Sequential(Residual(16), nn.Linear(16, 16), nn.GELU())
    xs = [torch.randn(8, 16) for _ in range(4)]
    gs = [torch.randn(8, 16) for _ in range(4)]
    twin = [m for m in __import__("copy").deepcopy(base)]
    _, hand_in = _run_stage(list(base), xs, gs, count=4)
    old = manual.ENABLED
    manual.ENABLED = False
    try:
        _, auto_in = _run_stage(twin, xs, gs, count=4)
    finally:
        manual.ENABLED = old
    for k, (a, b) in enumerate(zip(hand_in, auto_in)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"micro-batch {k}: {m}")
    for p, q in zip(base.parameters(), [p for m in twin for p in m.parameters()]):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)

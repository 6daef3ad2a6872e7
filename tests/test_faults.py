"""Faults and bad input found by trying the Pipeline as a new user would; each used to fail.

- close() while a step runs in another thread, and the interpreter exiting mid-step (run in
  subprocesses: on the old code they crashed the process);
- an action stuck past the timeout kept running and later wrote ``.grad`` or broke the next
  step ("forward ran twice"): now a failed step leaves every ``.grad`` as it was, for good;
- zero-bubble schedules ignored ``requires_grad`` changed after construction;
- a stage beginning with an in-place op (``ReLU(inplace=True)`` after a cut) failed;
- a ``loss_fn`` returning a tensor without grad silently gave no gradients, and inputs (or
  targets) with ``requires_grad=True`` got no ``.grad`` although the unsplit model gives one.
"""

import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from pipetrain.pipeline import Pipeline, PipelineError
from tests.models import D, Stall, assert_grads, batch, mlp, mse, reference


def _python(code: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


def test_close_while_a_step_runs_in_another_thread():
    out = _python("""
        import threading, time, torch
        from torch import nn
        from pipetrain import Pipeline, PipelineError
        from tests.models import Stall, mse
        model = nn.Sequential(nn.Linear(4, 4), Stall(0.2), nn.Linear(4, 4), Stall(0.2))
        pipe = Pipeline(model, 2, num_microbatches=8, loss_fn=mse)
        result = []
        def train():
            try:
                pipe.step(torch.randn(8, 4), torch.randn(8, 4))
                result.append("finished")
            except PipelineError as err:
                result.append("PipelineError: " + str(err))
        t = threading.Thread(target=train)
        t.start()
        time.sleep(0.5)
        pipe.close()
        t.join(20)
        assert not t.is_alive(), "the step did not end after close()"
        print(result[0])
        try:
            pipe.step(torch.randn(8, 4), torch.randn(8, 4))
        except (RuntimeError, PipelineError) as err:
            print("after close:", type(err).__name__, err)
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("PipelineError") and "close" in out.stdout.splitlines()[0]
    assert "after close:" in out.stdout and "closed" in out.stdout.splitlines()[-1]


def test_interpreter_exits_cleanly_mid_step():
    t0 = time.perf_counter()
    out = _python("""
        import threading, time, torch
        from torch import nn
        from pipetrain import Pipeline
        from tests.models import Stall, mse
        model = nn.Sequential(nn.Linear(4, 4), Stall(0.3), nn.Linear(4, 4), Stall(0.3))
        pipe = Pipeline(model, 2, num_microbatches=8, loss_fn=mse)
        def train():
            while True:
                pipe.step(torch.randn(8, 4), torch.randn(8, 4))
        threading.Thread(target=train, daemon=True).start()
        time.sleep(0.5)
        print("main returns")
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "terminate" not in out.stderr and "Fatal" not in out.stderr
    assert time.perf_counter() - t0 < 30


def test_interpreter_exit_waits_for_the_cleanup_after_a_cancelled_run():
    """Regression: exit closed the executor and went on as soon as the cancelled run was back
    in Python, while the daemon thread still did torch work in Runner.execute's cleanup
    (end_run, mailbox); finalization then killed it inside a torch op (pthread_exit through
    ~gil_scoped_release, noexcept): "terminate called without an active exception", -6. The
    cleanup is made slow here (as under load) so the old code aborts every time."""
    t0 = time.perf_counter()
    out = _python("""
        import threading, time, torch
        from torch import nn
        from pipetrain import Pipeline
        from pipetrain.stage import Stage
        from tests.models import Stall, mse
        model = nn.Sequential(nn.Linear(4, 4), Stall(0.3), nn.Linear(4, 4), Stall(0.3))
        pipe = Pipeline(model, 2, num_microbatches=8, loss_fn=mse)
        running = threading.Event()
        orig_begin, orig_end = Stage.begin_run, Stage.end_run
        def begin_run(self, *a, **k):
            running.set()
            return orig_begin(self, *a, **k)
        def end_run(self, commit):
            t, t_end = torch.zeros(64), time.monotonic() + 1.5
            while time.monotonic() < t_end:
                t.add_(1)   # drops and re-takes the GIL inside C++
            return orig_end(self, commit)
        Stage.begin_run, Stage.end_run = begin_run, end_run
        def train():
            while True:
                pipe.step(torch.randn(8, 4), torch.randn(8, 4))
        threading.Thread(target=train, daemon=True).start()
        running.wait(20)
        time.sleep(0.2)   # the run is under way (Stall sleeps in its first forward)
        print("main returns")
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "terminate" not in out.stderr and "Fatal" not in out.stderr
    assert "main returns" in out.stdout
    assert time.perf_counter() - t0 < 20


def test_nothing_starts_once_the_interpreter_is_exiting():
    """After the atexit close-all no executor is created (Runner._recover does not replace
    one) and no step starts: their threads would outlive it."""
    out = _python("""
        import torch
        from torch import nn
        import pipetrain.executor as ex
        from pipetrain import Pipeline
        from tests.models import mse
        pipe = Pipeline(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), 2,
                        num_microbatches=2, loss_fn=mse)
        pipe.step(torch.randn(4, 4), torch.randn(4, 4))
        ex._close_all()
        for make in (lambda: ex.Executor(2), lambda: pipe.step(torch.randn(4, 4), torch.randn(4, 4))):
            try:
                make()
            except RuntimeError as err:
                print("refused:", err)
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("refused:") == 2, out.stdout


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_an_action_stuck_past_the_timeout_touches_nothing_of_later_steps(where):
    """The stuck action returns after the step failed: it must not write .grad, nor leave
    state that breaks the next step; .grad is what it was before the failed step."""
    model = nn.Sequential(nn.Linear(D, D), Stall(0.0, backward=where == "backward"),
                          nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D)).double()
    x, y = batch()
    ref_loss, ref_grads = reference(model, x, y)
    before = [torch.full_like(p, 0.5) for p in model.parameters()]
    for p, g in zip(model.parameters(), before):
        p.grad = g.clone()
    pipe = Pipeline(model, 3, balance=[1, 2, 2], num_microbatches=4, loss_fn=mse, timeout=0.3)
    model[1].seconds = 1.5
    with pytest.raises(PipelineError):
        pipe.step(x, y)
    assert_grads(model, before, rtol=0, atol=0)
    time.sleep(2.0)                       # the stuck action has finished by now
    assert_grads(model, before, rtol=0, atol=0)
    model[1].seconds = 0.0
    loss = pipe.step(x, y)                # no "forward ran twice", exact gradients
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert_grads(model, [b + g for b, g in zip(before, ref_grads)])
    pipe.close()


@pytest.mark.parametrize("schedule", ["zb-h1", "zb-h2", "1f1b"])
def test_requires_grad_changes_after_construction_are_seen(schedule):
    model = mlp(4)
    x, y = batch()
    pipe = Pipeline(model, 2, schedule=schedule, num_microbatches=4, loss_fn=mse)
    for frozen in ([0, 3], [], [1]):      # freeze, unfreeze everything, freeze another
        for i, block in enumerate(model):
            block.requires_grad_(i not in frozen)
        _, ref = reference(model, x, y)
        pipe.step(x, y)
        assert_grads(model, ref)
        model.zero_grad()
    pipe.close()


@pytest.mark.parametrize("checkpoint", ["never", "always", "except_last"])
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_a_stage_may_begin_with_an_inplace_op(schedule, checkpoint):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(D, D), nn.ReLU(inplace=True), nn.Linear(D, D),
                          nn.ReLU(inplace=True), nn.Linear(D, D)).double()
    x, y = batch()
    ref_loss, ref_grads = reference(model, x, y)
    pipe = Pipeline(model, 3, balance=[1, 2, 2], schedule=schedule, num_microbatches=4,
                    loss_fn=mse, checkpoint=checkpoint)
    for _ in range(2):                    # the first forward decides; later ones copy
        loss = pipe.step(x, y)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
        assert_grads(model, ref_grads)
        model.zero_grad()
    pipe.close()


def test_a_loss_without_grad_is_an_error():
    pipe = Pipeline(mlp(4), 2, num_microbatches=2, loss_fn=lambda o, t: mse(o, t).detach())
    with pytest.raises(PipelineError, match="does not require grad") as info:
        pipe.step(*batch(4))
    assert info.value.stage == 1 and info.value.action == "F"
    pipe.close()


@pytest.mark.parametrize("schedule", ["gpipe", "zb-h1"])
def test_inputs_and_targets_that_require_grad_get_it_as_unsplit(schedule):
    model = mlp(4)
    base, y = batch()
    base.requires_grad_(True)
    y.requires_grad_(True)
    ref_loss, ref_grads = reference(model, base * 2.0, y)   # a non-leaf input, as a user's
    ref_base, ref_y = base.grad.clone(), y.grad.clone()
    base.grad = y.grad = None
    pipe = Pipeline(model, 2, schedule=schedule, num_microbatches=3, loss_fn=mse)
    loss = pipe.step(base * 2.0, y)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert_grads(model, ref_grads)
    torch.testing.assert_close(base.grad, ref_base, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y.grad, ref_y, rtol=1e-10, atol=1e-12)
    pipe.close()

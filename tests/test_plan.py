"""Tests for pipetrain.plan: runs that span several mini-batches, with optimizer updates (U).

A synchronous plan over 3 mini-batches with U actions must validate, simulate (U takes its
cost) and run, and equal three ``step()`` + optimizer steps of the unsplit model — the
independent reference is plain torch training on the whole mini-batches. Mutated plans (an
update before a backward it consumes, an F and its B on different versions) are rejected
with the rule named before anything runs.
"""

import copy

import pytest
import torch

from pipetrain import schedules
from pipetrain.pipeline import Pipeline, PipelineError
from pipetrain.plan import Plan
from tests.models import batch, mlp, mse

T = 3


def _reference(model, batches, make_opt):
    model = copy.deepcopy(model)
    opt = make_opt(list(model.parameters()))
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


@pytest.mark.parametrize("name,p,m", [("1f1b", 2, 2), ("gpipe", 3, 2), ("zb-h1", 2, 3),
                                      ("interleaved-1f1b", 2, 2), ("zb-h2", 2, 4)])
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_three_minibatch_plan_with_updates_equals_three_steps(name, p, m, optim):
    def make_opt(params):
        if optim == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)
        return torch.optim.Adam(params, lr=0.01)

    v = 2 if name.startswith("interleaved") else 1
    model = mlp(2 * p * v)
    batches = [batch(8, seed=t) for t in range(T)]
    ref_losses, ref_model = _reference(model, batches, make_opt)

    kwargs = {"num_chunks": v} if v > 1 else {}
    s = schedules.build(name, num_stages=p, num_microbatches=m, num_minibatches=T, updates=True,
                        **kwargs)
    s.validate()
    assert s.num_minibatches == T and s.has_updates
    plain = s.simulate(forward=1.0, backward=2.0)
    slow = s.simulate(forward=1.0, backward=2.0, update=5.0)
    assert slow.makespan >= plain.makespan + 5.0    # at least the last stage's last U
    pipe = Pipeline(model, p, schedule=name, num_microbatches=m, loss_fn=mse, **kwargs)
    plan = Plan(s)
    assert plan.count("U") == p * v * T
    for st in pipe.stages:
        st.optimizer = make_opt(st.params)
    outcome = pipe._execute(plan, batches)
    losses = [loss.item() for loss in outcome.run.losses_per_minibatch()]
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(st.versions.current == T for st in pipe.stages)   # T updates applied
    pipe.close()


def test_a_failing_update_is_named_with_its_minibatch():
    model = mlp(4)
    s = schedules.build("1f1b", num_stages=2, num_microbatches=2, num_minibatches=2, updates=True)
    pipe = Pipeline(model, 2, num_microbatches=2, loss_fn=mse)

    class Broken:
        def step(self):
            raise ArithmeticError("bad step")

        def zero_grad(self):
            pass

    pipe.stages[0].optimizer = torch.optim.SGD(pipe.stages[0].params, lr=0.1)
    pipe.stages[1].optimizer = Broken()
    with pytest.raises(PipelineError, match="stage 1, update after mini-batch 0, action U") as info:
        pipe._execute(Plan(s), [batch(4), batch(4, seed=2)])
    assert (info.value.stage, info.value.minibatch, info.value.action) == (1, 0, "U")
    pipe.close()


def _text(s):
    return "\n".join(line for line in str(s).splitlines())


@pytest.mark.parametrize("mutation,rule", [
    ("update-before-backward", "update-after-gradient"),
    ("versions-differ", "version-mismatch"),
])
def test_mutated_plans_are_rejected_with_the_rule(mutation, rule):
    s = schedules.build("1f1b", num_stages=2, num_microbatches=2, num_minibatches=2, updates=True)
    rows = [[str(a) for a in s.actions(d)] for d in range(2)]
    if mutation == "update-before-backward":
        row = rows[0]
        u, b = row.index("0U0"), row.index("0B1@0")
        row[u], row[b] = row[b], row[u]            # U(0, 0) now comes before B of mb 1
    else:
        row = rows[1]
        row[row.index("1B1@0")] = "1B1@1"          # F on version 0, its B on version 1
    bad = schedules.Schedule.from_actions(rows, num_stages=2, num_microbatches=2,
                                          num_minibatches=2)
    with pytest.raises(schedules.ScheduleError) as info:
        Plan(bad)
    assert info.value.rule == rule

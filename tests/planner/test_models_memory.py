"""The schedule table's closed forms and the memory model, against the simulator and by hand."""

import pytest

from pipetrain import schedules
from pipetrain.planner import Affine, CostTable, device_memory
from pipetrain.planner.costs import parse_bytes
from pipetrain.planner.schedule_models import MODELS, models_for


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2"])
def test_inflight_closed_form_equals_built_schedule(name):
    model = MODELS[name]
    for p in (1, 2, 3, 4, 8):
        for m in (1, 2, 3, 4, 8, 12, 16):
            for v in model.chunks:
                if (v > 1 and p == 1) or not model.valid(p, m, v):
                    continue
                built = schedules.build(name, num_stages=p, num_microbatches=m, num_chunks=v)
                assert [model.inflight(p, m, v, d) for d in range(p)] == built.peak_inflight()


def test_sync_step_time_is_the_simulators():
    # Uniform stages: GPipe / 1F1B take (m + p - 1)(F + B) with free transfers.
    for name in ("gpipe", "1f1b"):
        t = MODELS[name].simulate(4, 8, 1, [1.0] * 4, [2.0] * 4, [1.0] * 4, 0.0)
        assert t == pytest.approx((8 + 4 - 1) * 3.0)


def test_2bw_steady_state_closed_form():
    # No flush: m * (slowest device's F + B + two boundary transfers).
    t = MODELS["2bw"].simulate(4, 8, 1, [1, 1, 2, 1], [2, 2, 3, 2], [1] * 4, 0.25)
    assert t == pytest.approx(8 * (2 + 3 + 0.5))
    assert MODELS["2bw"].versions(4, 0) == 2 and MODELS["pipedream"].versions(4, 1) == 3
    assert not MODELS["2bw"].valid(4, 3, 1) and MODELS["2bw"].valid(4, 4, 1)


def test_async_rows_need_allow_async():
    assert all(not m.asynchronous for m in models_for("all", False))
    assert {"2bw", "2bw-predict"} <= {m.name for m in models_for("all", True)}
    with pytest.raises(ValueError, match="allow_async"):
        models_for(["2bw"], False)
    with pytest.raises(ValueError, match="unknown schedule"):
        models_for(["nope"], True)


def _table(n=4):
    # Layer l: input 10 b bytes, activations 100 b (+ input kept inside a stage), params 1000.
    return CostTable(forward=[Affine(0, 1)] * n, backward=[Affine(0, 2)] * n,
                     weight=[Affine(0, 1)] * n, activation=[Affine(0, 100)] * n,
                     input_bytes=[Affine(0, 10)] * n, param_bytes=[1000.0] * n,
                     grad_factor=1.0, optimizer_factor=2.0)


def test_device_memory_by_hand():
    t = _table()
    # Two stages of two layers, 1F1B: in flight 2 on device 0, 1 on device 1; b = 3.
    mem = device_memory(t, [2, 2], 2, 3, [2, 1], [1, 1], recompute=False)
    stash = 10 * 3 + 100 * 3 + 10 * 3 + 100 * 3   # input, acts, inner input, acts
    assert mem[0].activations == 2 * stash and mem[1].activations == stash
    assert mem[0].weights == 2000 and mem[0].gradients == 2000 and mem[0].optimizer == 4000
    assert mem[0].total == 2000 + 2000 + 4000 + 2 * stash
    rc = device_memory(t, [2, 2], 2, 3, [2, 1], [2, 2], recompute=True)
    assert rc[0].activations == 2 * 30 and rc[0].transient == stash and rc[0].weights == 4000


def test_affine_fit_and_bytes():
    f = Affine.fit([1, 2, 4], [3.0, 5.0, 9.0])
    assert f.fixed == pytest.approx(1.0) and f.per_sample == pytest.approx(2.0)
    assert Affine.fit([1, 2], [-1.0, 4.0])(0) == 0.0          # never below zero
    assert parse_bytes("80GB") == 80e9 and parse_bytes("16GiB") == 16 * 2 ** 30
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_transformer_table_parameter_count():
    # Megatron's 8.3B: 72 layers, h = 3072; 12 h^2 L + V h = 8.3e9 (within 1 %).
    t = CostTable.transformer(72, 3072, 1024, 32, vocab=51200)
    assert sum(t.param_bytes) / 2 == pytest.approx(8.3e9, rel=0.01)


def test_order_activations_walk_each_stage_its_own_bytes():
    # Against the Action API's own walk (the function reads the core's raw rows).
    from pipetrain import schedules
    from pipetrain.planner import Affine, CostTable
    from pipetrain.planner.memory import order_activations, stage_ranges
    from pipetrain.schedules import Kind
    n = 6
    t = CostTable(forward=[Affine(0, 1)] * n, backward=[Affine(0, 2)] * n,
                  weight=[Affine(0, 1)] * n, activation=[Affine(0, 10 * (i + 1)) for i in range(n)],
                  input_bytes=[Affine(0, 1)] * n, param_bytes=[1.0] * n, inner_input=[False] * n)
    balance = [2, 1, 2, 1]
    for name, v in (("interleaved-1f1b", 2), ("1f1b", 1), ("zb-h1", 1)):
        bal = balance if v > 1 else [3, 3]
        s = schedules.build(name, num_stages=2, num_microbatches=4, num_chunks=v)
        per = [t.stash(f, l, 1) for f, l in stage_ranges(bal)]
        want = []
        for d in range(2):
            held = peak = 0.0
            for a in s.actions(d):
                if a.kind == Kind.F:
                    held += per[a.stage]
                    peak = max(peak, held)
                elif a.kind in (Kind.B, Kind.I):
                    held -= per[a.stage]
            want.append(peak)
        assert order_activations(s, t, bal, 1, False) == want, name
        if v == 1:    # one stage per device: in-flight count x its stash
            assert want == [k * per[d] for d, k in enumerate(s.peak_inflight())]

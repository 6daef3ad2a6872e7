"""The ``compiled`` bench section's machinery on a tiny workload with ``aot_eager`` (inductor
compiles take too long for a test): every row measured, the ratios the table prints are
the medians of per-round ratios, and the GIL-wait share is a fraction."""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:      # bench/ is not installed; it is run from the repo root
    sys.path.insert(0, str(ROOT))

from bench import _peer_models as pm, compiled  # noqa: E402
from bench._peer_models import Workload  # noqa: E402
from bench.peers import Context, measure_workload, _ratio  # noqa: E402


def test_rows_and_ratios(monkeypatch):
    monkeypatch.setattr(compiled, "COMPILE", {"backend": "aot_eager"})
    wl = Workload("fine", "linear", 8, 4, 8, 8, rounds=3, steps=1, warmup=1, budget_s=30)
    x, y = pm.data(wl)
    results = measure_workload(wl, Context(wl, x, y, None, "none"), compiled.make_rows(wl),
                               log=lambda *a: None)
    assert [r.error for r in results] == [None] * len(results)
    rep = compiled.report(wl, results)
    rows = {r["row"]: r for r in rep["rows"]}
    assert set(rows) == {"unsplit, 1 thr", "pipetrain 1f1b", "pipetrain 1f1b, compiled",
                         "pipetrain zb-h1", "pipetrain zb-h1, compiled",
                         "pipetrain 1f1b, p=1, 1 thr", "pipetrain 1f1b, p=1, 1 thr, compiled"}
    by = {r.row.name: r for r in results}
    assert rows["pipetrain 1f1b, compiled"]["compiled_over_eager"] == \
        _ratio(by["pipetrain 1f1b, compiled"], by["pipetrain 1f1b"])
    assert rows["pipetrain 1f1b"]["compiled_over_eager"] is None
    assert rows["pipetrain 1f1b, compiled"]["compile_s"] >= 0
    assert 0 <= rows["pipetrain 1f1b"]["gil_wait_share"] < 1
    assert rep["p1_over_p2"]["eager"] == _ratio(by["pipetrain 1f1b, p=1, 1 thr"], by["pipetrain 1f1b"])
    assert rep["best_compiled"].endswith(", compiled") and not rep["best_eager"].endswith(", compiled")
    compiled.print_table(rep)


def test_quick_mode_skips(tmp_path, capsys):
    assert compiled.run(True, tmp_path) == []

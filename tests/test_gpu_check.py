"""``python -m bench --gpu-check``: the no-GPU path, and the orchestration / report logic with
fake parts and fake devices (nothing CUDA runs here)."""

from __future__ import annotations

import json
import pathlib
import sqlite3
import sys
import time

import pytest
import torch


ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import _peer_gpu_parts as gp  # noqa: E402
from bench import gpu_check as gc  # noqa: E402

FAKE_GPU = {"status": "pass", "devices": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "capability": "9.0",
                                           "memory_gib": 79.1, "sms": 132, "peak_gbs_properties": 3352.3,
                                           "peak_gbs_datasheet": 3350}], "torch": "x"}


def _part(name, status=None, exc=None, sleep=0.0):
    def fn(ctx, timeout):
        time.sleep(sleep)
        if exc:
            raise exc
        return {"status": status, "detail": f"{name} said {status}"}
    return gc.Part(name, f"fake {name}", 5, fn)


def test_no_gpu_prints_what_it_would_run_and_exits_0(tmp_path):
    lines = []
    rc = gc.main(["--out", str(tmp_path)], probe=lambda: {"status": "pass", "devices": []},
                 log=lines.append)
    assert rc == 0
    text = "\n".join(lines)
    assert "no CUDA device" in text
    for p in gc.PARTS:
        assert p.name in text
    assert "no CUDA device" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path (a GPU is present)")
def test_no_gpu_through_the_bench_entry_point(tmp_path):
    # The real probe, in a child process: this machine has no CUDA device.
    r = gc.run_cmd([sys.executable, "-m", "bench", "--gpu-check", "--out", str(tmp_path)], 120)
    assert r["rc"] == 0, r["tail"]
    assert "found no CUDA device" in r["tail"] and "nsys_nvtx" in r["tail"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["verdict"] == "no CUDA device"


def test_a_failing_part_makes_the_exit_code_nonzero(tmp_path):
    parts = [_part("a", "pass"), _part("b", "fail"), _part("c", "skip"), _part("d", exc=ValueError("boom"))]
    rc = gc.main(["--out", str(tmp_path)], parts=parts, probe=lambda: FAKE_GPU, log=lambda *a: None)
    assert rc == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [p["status"] for p in report["parts"]] == ["pass", "fail", "skip", "fail"]
    assert report["verdict"] == "FAIL: b, d"
    assert "ValueError: boom" in report["parts"][3]["detail"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| b | fail |" in md and "H100" in md


def test_all_passing_or_skipped_parts_exit_0(tmp_path):
    rc = gc.main(["--out", str(tmp_path)], parts=[_part("a", "pass"), _part("c", "skip")],
                 probe=lambda: FAKE_GPU, log=lambda *a: None)
    assert rc == 0
    assert "**PASS**" in (tmp_path / "gpu_check.md").read_text()


def test_budget_spent_parts_fail_without_running(tmp_path):
    ctx = gc.Ctx(tmp_path, FAKE_GPU)
    res = gc.run_parts(ctx, [_part("slow", "pass", sleep=0.2), _part("late", "pass")], budget_s=5.1,
                       log=lambda *a: None)
    assert res[0]["status"] == "pass" and res[1]["status"] == "fail"
    assert "budget" in res[1]["detail"]


def test_run_cmd_times_out_and_kills_the_group():
    t0 = time.monotonic()
    r = gc.run_cmd([sys.executable, "-c", "import subprocess, sys, time; "
                    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"], 1.0)
    assert r["rc"] is None and time.monotonic() - t0 < 10


def test_child_results_and_crashes(tmp_path):
    ctx = gc.Ctx(tmp_path, FAKE_GPU)
    res = gc.run_child(ctx, "probe", 120)
    assert res["status"] == "pass" and res["devices"] == []
    res = gc.run_child(ctx, "no-such-part", 60)
    assert res["status"] == "fail"


def test_junit_summary_flags_cuda_skips(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text("""<testsuites><testsuite>
      <testcase classname="t" name="ok"/>
      <testcase classname="t" name="cuda_one"><skipped message="needs pipetrain._C_cuda and a CUDA device"/></testcase>
      <testcase classname="t" name="two"><skipped message="needs two CUDA devices and the CUDA backend"/></testcase>
      <testcase classname="t" name="guard"><skipped message="a CUDA device is present; this checks the guard"/></testcase>
      <testcase classname="t" name="bad"><failure message="x"/></testcase>
    </testsuite></testsuites>""")
    s = gc.junit_summary(xml, gpus=1)
    assert (s["passed"], s["failed"], s["skipped"]) == (1, 1, 3)
    assert [b.split(": ")[0] for b in s["bad_skips"]] == ["t::cuda_one"]
    assert len(gc.junit_summary(xml, gpus=2)["bad_skips"]) == 2    # with 2 GPUs, "two" must run


def test_bandwidth_rows_against_peak():
    rows = gc.bandwidth_rows({"cuda": [{"n": 1, "variant": "ours", "gb_s": 1675.0},
                                       {"n": 1, "variant": "torch best", "gb_s": 900.0},
                                       {"n": 1, "variant": "copy", "gb_s": 2680.0}]}, 3350.0)
    assert [(r["variant"], round(r["pct_peak"])) for r in rows] == [("ours", 50), ("copy", 80)]
    assert gp.datasheet_gbs("NVIDIA H100 PCIe") == 2000 and gp.datasheet_gbs("NVIDIA H200") == 4800
    assert gp.datasheet_gbs("Some GPU") is None


def _fake_nsys_db(path, names, domain="pipetrain"):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE StringIds (id INTEGER, value TEXT)")
    con.execute("CREATE TABLE NVTX_EVENTS (start INT, end INT, eventType INT, text TEXT, "
                "textId INT, domainId INT)")
    con.execute("INSERT INTO NVTX_EVENTS VALUES (0, 0, 75, ?, NULL, 7)", (domain,))
    con.execute("INSERT INTO StringIds VALUES (1, 's0/F0')")
    for i, n in enumerate(names):
        if n == "s0/F0":      # one name through the string table, as registered strings are stored
            con.execute("INSERT INTO NVTX_EVENTS VALUES (?, ?, 59, NULL, 1, 7)", (i, i + 1))
        else:
            con.execute("INSERT INTO NVTX_EVENTS VALUES (?, ?, 59, ?, NULL, 7)", (i, i + 1, n))
    con.execute("INSERT INTO NVTX_EVENTS VALUES (0, 1, 59, 'user range', NULL, 0)")
    con.commit()
    con.close()


def test_nvtx_check_from_an_nsys_sqlite_export(tmp_path):
    want = [f"s{s}/{k}{i}" for s in range(2) for k in "FB" for i in range(4)]
    db = tmp_path / "ok.sqlite"
    _fake_nsys_db(db, want * 2)
    ranges = gp.nvtx_ranges_from_sqlite(str(db))
    assert ("pipetrain", "s0/F0") in ranges and ("default", "user range") in ranges
    ok = gp.check_nvtx(ranges, 2, 4, ["F", "B"], 2)
    assert ok["status"] == "pass", ok["detail"]
    db2 = tmp_path / "short.sqlite"
    _fake_nsys_db(db2, want * 2 + ["s1/B3"])                  # a third s1/B3: wrong count
    assert gp.check_nvtx(gp.nvtx_ranges_from_sqlite(str(db2)), 2, 4, ["F", "B"], 2)["status"] == "fail"
    db3 = tmp_path / "other.sqlite"
    _fake_nsys_db(db3, want * 2, domain="elsewhere")          # right names, wrong domain
    assert gp.check_nvtx(gp.nvtx_ranges_from_sqlite(str(db3)), 2, 4, ["F", "B"], 2)["status"] == "fail"


def test_kernel_part_runs_under_the_interpreter():
    # The same comparison code the GPU runs, on CPU tensors under TRITON_INTERPRET=1
    # (tests/conftest.py): checks the cases' arguments and the comparison, not the GPU.
    res = gp.triton_kernels("cpu", sizes=(1, 37))
    assert res["status"] == "pass", res["mismatches"]
    assert len(res["rows"]) == 7 * 2


def test_kernel_part_catches_a_wrong_kernel(monkeypatch):
    import pipetrain.kernels

    monkeypatch.setattr(pipetrain.kernels, "sgd_predict", lambda *a, **k: None, raising=False)
    res = gp.triton_kernels("cpu", sizes=(37,))
    assert res["status"] == "fail" and "sgd_predict" in res["detail"]

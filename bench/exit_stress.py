"""Stress: a daemon thread training while the main thread returns (interpreter exit).

Runs the child of tests/test_faults.py::test_interpreter_exits_cleanly_mid_step many times
with variations (exit delay, devices, stalls in forward/backward, transfer) and counts
aborts (returncode < 0, "terminate" in stderr). Bounded by --seconds. Not run by pytest.

    python bench/exit_stress.py --seconds 120 [--load 2] [--gdb] [--delays 0.05,0.5]
"""
import argparse, os, random, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = """
import threading, time, torch
from torch import nn
from pipetrain import Pipeline
from tests.models import Stall, mse
p, delay, st, bwd, transfer = {p}, {delay}, {stall}, {bwd}, {transfer!r}
layers = []
for i in range(p):
    layers += [nn.Linear(4, 4), Stall(st, backward=bwd)]
pipe = Pipeline(nn.Sequential(*layers), p, num_microbatches=8, loss_fn=mse, transfer=transfer)
def train():
    while True:
        pipe.step(torch.randn(8, 4), torch.randn(8, 4))
threading.Thread(target=train, daemon=True).start()
time.sleep(delay)
print("main returns")
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--load", type=int, default=0, help="busy-loop processes")
    ap.add_argument("--gdb", action="store_true", help="run children under gdb, print the abort stack")
    ap.add_argument("--delays", default="0.05,0.1,0.2,0.3,0.5,0.7,1.0",
                    help="exit delays to draw from (0: exit while the thread starts its first "
                         "torch.randn, user code pipetrain cannot protect)")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=ROOT)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    t_end = time.time() + args.seconds
    n = fails = 0
    try:
        while time.time() < t_end:
            cfg = dict(p=random.choice([2, 3, 4]),
                       delay=random.choice([float(x) for x in args.delays.split(",")]),
                       stall=random.choice([0.0, 0.01, 0.05, 0.3]), bwd=random.random() < 0.3,
                       transfer=random.choice(["auto", "copy"]))
            code = CHILD.format(**cfg)
            cmd = [sys.executable, "-c", code]
            if args.gdb:
                cmd = ["gdb", "-q", "-batch", "-ex", "set pagination off", "-ex", "run",
                       "-ex", "thread apply all bt 30", "--args"] + cmd
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
            n += 1
            bad = out.returncode != 0 or "terminate" in out.stderr or "Fatal" in out.stderr \
                or (args.gdb and "SIGABRT" in out.stdout)
            if bad:
                fails += 1
                print(f"FAIL #{fails} run {n} cfg={cfg} rc={out.returncode}\n--stderr--\n"
                      f"{out.stderr[-3000:]}\n--stdout--\n{out.stdout[-12000:]}", flush=True)
    finally:
        for b in busy:
            b.kill()
    print(f"{n} runs, {fails} failures")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())

"""Bench section ``convergence``: do asynchronous pipelines train as well as synchronous ones?

Trains the two tasks of ``bench/tasks.py`` (digits: residual MLP; charlm: character-level
transformer on the stdlib's sources) split into p stages, the same seeds, data and number of
updates for every method, in three columns (p, m): (4, 4) and (8, 8) -- m = p, the least 2BW
accepts, so a stage is at most one update behind -- and (8, 1), PipeDream's own regime (an
update per micro-batch, stage r up to p-r-1 = 7 updates behind; 2BW cannot run there).
Methods:

- Adam: ``sync`` (1F1B with a flush: the baseline), ``pipedream`` (weight stashing), ``2bw``,
  ``2bw-predict``, ``xpipe`` and ``stale`` (no stashing, backward on the live weights);
- momentum SGD: ``sync``, ``spectrain`` and ``stale``, SpecTrain's own optimizer, with its
  own synchronous baseline.

Per (task, column, method) it prints the final evaluation metric (digits: test accuracy;
charlm: validation loss, nats/char) as mean ± std over the seeds and its difference from sync
with the same optimizer; then, from the training loss (moving average, mean over seeds):
"reach", the update at which it first reaches sync's final value (">N": never), and
"sync@", the update at which sync first reached this method's final value (how many
synchronous updates its whole run is worth). It writes the loss curves
(``convergence_<task>.png``) and every number (``convergence.json``) to the out folder.

The training runs through ``trainer``: default (``"pipeline"``) the real pipeline's ``train()``
(:mod:`bench.async_trainer`; ``stale`` is delegated to the reference, the runtime always
stashes); ``"reference"`` (``--reference``): ``pipetrain.async_reference.reference_train``;
or any callable with that signature.
Run alone: ``python -m bench.convergence [--quick | --full] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch

from bench import tasks as task_lib

# (label, schedule, optimizer kind)
METHODS = [
    ("sync", "sync", "adam"),
    ("pipedream", "pipedream", "adam"),
    ("2bw", "2bw", "adam"),
    ("2bw-predict", "2bw-predict", "adam"),
    ("xpipe", "xpipe", "adam"),
    ("stale", "stale", "adam"),
    ("sync sgd", "sync", "sgd"),
    ("spectrain sgd", "spectrain", "sgd"),
    ("stale sgd", "stale", "sgd"),
]

FULL = {"columns": ((4, 4), (8, 8), (8, 1)), "seeds": (0, 1, 2),
        "steps": {"digits": 80, "charlm": 60}, "digits": {}, "charlm": {}}
# The main job's default: one seed, both depths at m = p, half the updates (~1 minute).
DEFAULT = {"columns": ((4, 4), (8, 8)), "seeds": (0,), "steps": {"digits": 40, "charlm": 30},
           "digits": {}, "charlm": {}}
# CI: every method and both depths, one seed, a few updates of smaller models: it checks the
# section end to end (and that nothing diverges), not convergence.
QUICK = {"columns": ((4, 4), (8, 8), (8, 1)), "seeds": (0,), "steps": {"digits": 6, "charlm": 4},
         "digits": {"width": 16, "blocks": 6, "batch": 32},
         "charlm": {"width": 16, "blocks": 6, "seq": 16, "batch": 8, "chars": 20_000}}


def _optimizer(kind: str, lr: float):
    if kind == "adam":
        return lambda params: torch.optim.Adam(params, lr=lr)
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)


def _smooth(xs: list[float], window: int) -> list[float]:
    """Trailing moving average (shorter at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _runs_at(schedule: str, p: int, m: int) -> bool:
    return not (schedule in ("2bw", "2bw-predict") and m < p)


def train_one(task, p: int, m: int, seed: int, steps: int, schedule: str, kind: str,
              trainer) -> dict:
    """One training run; evaluates the final weights returned by the trainer on a fresh copy."""
    stages = task_lib.split(task.build(seed), p)
    losses, weights = trainer(stages, task.batches(seed, steps), schedule=schedule,
                              num_microbatches=m, loss_fn=task.loss_fn,
                              optimizer_factory=_optimizer(kind, task.lr[kind]))
    fresh = task_lib.split(task.build(seed), p)
    for stage, state in zip(fresh, weights):
        stage.load_state_dict(state)
    return {"losses": [float(x) for x in losses], **task.evaluate(list(fresh))}


def _fmt(xs: list[float], scale: float = 1.0) -> str:
    mean = statistics.fmean(xs) * scale
    std = statistics.stdev(xs) * scale if len(xs) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}" if scale == 1.0 else f"{mean:.1f} ± {std:.1f}"


def run(quick: bool, out: pathlib.Path, trainer=None, full: bool = False) -> dict:
    """The section: ``quick`` (CI), the default (one seed, ~1 minute) or ``full`` (3 seeds,
    p = 4 and 8, m = p and m = 1; ~10 minutes here: ``python -m bench --full --only
    convergence``)."""
    if trainer is None or trainer == "pipeline":     # the real pipeline's train()
        from bench.async_trainer import pipeline_train as trainer
    elif trainer == "reference":
        from pipetrain.async_reference import reference_train as trainer
    cfg = QUICK if quick else (FULL if full else DEFAULT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: more threads only add overhead (and contention)
    results = {}
    t_start = time.perf_counter()
    try:
        for name in ("digits", "charlm"):
            task = getattr(task_lib, name)(**cfg[name])
            steps = cfg["steps"][name]
            for p, m in cfg["columns"]:
                for label, schedule, kind in METHODS:
                    if not _runs_at(schedule, p, m):
                        continue
                    runs = []
                    for seed in cfg["seeds"]:
                        t0 = time.perf_counter()
                        r = train_one(task, p, m, seed, steps, schedule, kind, trainer)
                        runs.append(r)
                        print(f"  {name} p={p} m={m} {label:14s} seed {seed}: "
                              f"{task.metric} {r[task.metric]:.4f}, last loss "
                              f"{r['losses'][-1]:.3f}  ({time.perf_counter() - t0:.1f} s)",
                              flush=True)
                    results[(name, p, m, label)] = runs
        _report(results, cfg, out)
    finally:
        torch.set_num_threads(threads)
    print(f"convergence: {time.perf_counter() - t_start:.0f} s in all")
    return results


def _steps_to(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, x in enumerate(curve) if x <= target), None)


def _report(results: dict, cfg: dict, out: pathlib.Path) -> None:
    summary = {}
    for name in ("digits", "charlm"):
        steps = cfg["steps"][name]
        window = max(3, steps // 10)
        metric = "accuracy" if name == "digits" else "loss"
        scale = 100.0 if metric == "accuracy" else 1.0
        unit = "test accuracy %" if metric == "accuracy" else "val loss (nats/char)"
        print(f"\n{name}: {unit}, mean ± std over {len(cfg['seeds'])} seeds, {steps} updates; "
              "'vs sync': difference of means from sync with the same optimizer; 'reach' / "
              "'sync@': see the section's docstring")
        head = f"{'method':14s}" + "".join(
            f" | p={p} m={m}: {'final':>13s} {'vs sync':>7s} {'reach':>5s} {'sync@':>5s}"
            for p, m in cfg["columns"])
        print(head + "\n" + "-" * len(head))
        curves = {}
        for key, runs in results.items():
            if key[0] == name:
                mean_curve = [statistics.fmean(c) for c in zip(*[r["losses"] for r in runs])]
                curves[key[1:]] = _smooth(mean_curve, window)
        for label, schedule, kind in METHODS:
            base = "sync" if kind == "adam" else "sync sgd"
            row = f"{label:14s}"
            for p, m in cfg["columns"]:
                if (p, m, label) not in curves:
                    row += f" | {'':8s} {'-':>13s} {'':7s} {'':5s} {'':5s}"
                    continue
                vals = [r[metric] for r in results[(name, p, m, label)]]
                ref = [r[metric] for r in results[(name, p, m, base)]]
                delta = (statistics.fmean(vals) - statistics.fmean(ref)) * scale
                mine, sync = curves[(p, m, label)], curves[(p, m, base)]
                reach, worth = _steps_to(mine, sync[-1]), _steps_to(sync, mine[-1])
                row += (f" | {'':8s} {_fmt(vals, scale):>13s} {delta:+7.3f} "
                        f"{str(reach) if reach else '>' + str(steps):>5s} "
                        f"{str(worth) if worth else '>' + str(steps):>5s}")
                summary[f"{name} p={p} m={m} {label}"] = {
                    metric: vals, "vs_sync": delta / scale, "reach": reach, "sync_at": worth,
                    "eval_loss": [r["loss"] for r in results[(name, p, m, label)]],
                    "train_loss_curve": mine}
            print(row)
        _plot(name, cfg, curves, out / f"convergence_{name}.png")
    (out / "convergence.json").write_text(json.dumps(summary, indent=1))


def _plot(name: str, cfg: dict, curves: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = cfg["columns"]
    fig, axes = plt.subplots(1, len(cols), figsize=(5.5 * len(cols), 4), sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, (p, m) in zip(axes, cols):
        for i, (label, _, kind) in enumerate(METHODS):  # one colour per method in every panel
            if (p, m, label) in curves:
                c = curves[(p, m, label)]
                ax.plot(range(1, len(c) + 1), c, label=label, color=colors(i),
                        linestyle="-" if kind == "adam" else "--")
        ax.set_title(f"{name}, p = {p}, m = {m}")
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (moving average, mean over seeds)")
    axes[0].legend(fontsize=8)   # the first panel (m = p) has every method
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the short CI version")
    mode.add_argument("--full", action="store_true", help="3 seeds, m = p and m = 1 (~10 min)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/out"))
    parser.add_argument("--reference", action="store_true",
                        help="train with the plain-torch reference instead of the pipeline")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run(quick=args.quick, out=args.out, trainer="reference" if args.reference else "pipeline",
        full=args.full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

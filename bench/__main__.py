"""The main job: every benchmark section in turn, printing tables and writing pictures.

Usage: ``python -m bench [--quick | --full] [--out DIR] [--only SECTION ...]``, or
``python -m bench --gpu-check [--out DIR]`` (bench/gpu_check.py).
Each section is a module in ``bench/`` with ``run(quick: bool, out: pathlib.Path) -> None``.
"""

import argparse
import importlib
import inspect
import pathlib
import sys

# Sections in the order they run; a section whose module is absent is reported, not fatal.
SECTIONS = ["schedule_table", "executor_overhead", "step_overhead", "batched_w", "training", "floor_gap",
            "optim_kernels",
            "peers", "peers_training", "shm_wire", "compiled", "graph_partition", "graph_runtime", "convergence", "async_throughput",
            "planner"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    parser.add_argument("--full", action="store_true",
                        help="the long versions of sections that have one (convergence: 3 seeds)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/out"),
                        help="where pictures and traces go (default: bench/out)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--gpu-check", action="store_true",
                        help="GPU readiness check instead of the sections (bench/gpu_check.py)")
    args = parser.parse_args(argv)
    if args.gpu_check:
        from bench import gpu_check
        return gpu_check.main(["--out", str(args.out)])
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or SECTIONS:
        print(f"\n=== {name} ===")
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"bench.{name}":
                raise
            print(f"(section {name} is not built yet)")
            continue
        kwargs = {"full": True} if args.full and "full" in inspect.signature(module.run).parameters else {}
        module.run(quick=args.quick, out=args.out, **kwargs)
    print(f"\noutputs in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

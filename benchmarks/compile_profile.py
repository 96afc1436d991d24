"""Where a variant's compile time goes: tracing, XLA's HLO passes, the backend.

For each variant of ``bench_guard.py`` (the same tree, the same donated training-step
update) a fresh process traces and lowers the step (``jit(...).lower``), compiles it
(``.compile()``) and counts what the compiled program holds; XLA's own per-pass timers
(``TF_CPP_VMODULE=hlo_pass_pipeline=1``) are read from that process's log. The table
gives, per variant:

* ``trace s``: Python tracing and lowering to StableHLO;
* ``compile s``: ``compile()``, of which ``passes s`` is the sum of XLA's HLO pass
  timers and ``backend s`` the rest (code generation, buffer assignment);
* ``kernels``: fusions, custom calls and other non-trivial operations in the compiled
  entry computation (each is code to generate and a kernel to launch);
* the three slowest HLO passes.

Usage::

    python benchmarks/compile_profile.py --params 4e6 --leaves 1000 \\
        --variants adamw "guard, both False" "guard (all on)"
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

_PASS_TIME = re.compile(r"HLO pass: (\S+) time: \S+ \S+ \((\d+) us\)")
_PIPELINE = re.compile(r"Running HLO pass pipeline on module \S+ (.+)$")
_TRIVIAL = ("parameter", "get-tuple-element", "tuple", "constant", "bitcast")


def profile_one(num_params: int, num_leaves: int, variant: str) -> dict:
    """In this process: lower, compile and count one variant (the child's job)."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_guard

    factory, takes_loss = bench_guard.variants()[variant]
    params = bench_guard.make_tree(num_params, num_leaves, seed=0)
    grads = bench_guard.make_tree(num_params, num_leaves, seed=1)
    tx = factory()
    state = jax.eval_shape(tx.init, params)
    start = time.perf_counter()
    lowered = bench_guard.make_step(tx, takes_loss).lower(params, state, grads, jnp.float32(1.0))
    traced = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    text = compiled.as_text()
    entry = text[text.index("ENTRY") :]
    ops = collections.Counter(re.findall(r"= \S+ ([a-z][\w-]*)\(", entry))
    kernels = sum(n for op, n in ops.items() if op not in _TRIVIAL)
    return {"trace_s": traced - start, "compile_s": done - traced, "kernels": kernels}


def profile(num_params: int, num_leaves: int, variant: str) -> dict:
    """Runs :func:`profile_one` in a fresh process with XLA's pass timers on."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="hlo_pass_pipeline=1")
    args = [sys.executable, __file__, "--child", "--params", str(num_params), "--leaves", str(num_leaves)]
    result = subprocess.run([*args, "--variants", variant], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{variant}: the profiling process failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    passes: collections.Counter = collections.Counter()
    pipelines = set()  # a pass that is itself a pipeline: its time is its passes'
    for line in result.stderr.splitlines():
        match = _PASS_TIME.search(line)
        if match:
            passes[match.group(1)] += int(match.group(2))
        match = _PIPELINE.search(line)
        if match:
            pipelines.add(match.group(1).strip())
    passes = collections.Counter({name: us for name, us in passes.items() if name not in pipelines})
    # Every module the process compiled is counted (the step's is by far the largest).
    row["passes_s"] = sum(passes.values()) / 1e6
    row["backend_s"] = row["compile_s"] - row["passes_s"]
    row["top_passes"] = [(name, us / 1e6) for name, us in passes.most_common(3)]
    return row


def format_table(num_params: int, num_leaves: int, rows: dict[str, dict]) -> str:
    lines = [
        f"{num_params / 1e6:g}M parameters in {num_leaves} leaves",
        "| variant | trace s | compile s | passes s | backend s | kernels | slowest passes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in rows.items():
        top = ", ".join(f"{p} {s:.2f}" for p, s in row["top_passes"])
        lines.append(
            f"| {name} | {row['trace_s']:.2f} | {row['compile_s']:.2f} | {row['passes_s']:.2f} | "
            f"{row['backend_s']:.2f} | {row['kernels']} | {top} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=4e6, help="parameters in the tree (default 4e6)")
    parser.add_argument("--leaves", type=int, default=1000, help="leaves in the tree (default 1000)")
    parser.add_argument(
        "--variants", nargs="+", default=["adamw", "guard (all on)"], help="bench_guard.py variant names"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    num_params = int(args.params)
    if args.child:
        print(json.dumps(profile_one(num_params, args.leaves, args.variants[0])))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_guard

    unknown = sorted(set(args.variants) - set(bench_guard.variants()))
    if unknown:
        parser.error(f"unknown --variants {unknown}; known: {list(bench_guard.variants())}")
    rows = {name: profile(num_params, args.leaves, name) for name in args.variants}
    print(format_table(num_params, args.leaves, rows))


if __name__ == "__main__":
    main()

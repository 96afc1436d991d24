"""Host tools at scale: reading, diagnosing and plotting a long run's JSON Lines log.

Writes a synthetic log (default 300,000 rows x 64 metric columns, about 1 GB, the shape
of a guard run with per-layer norms, a few planted spikes and non-finite steps) into a
temporary folder, then times, each in a fresh subprocess (imports excluded):

* ``json``: a plain ``for line in file: json.loads(line)`` loop over the file (the floor);
* ``diagnose``: ``gh.diagnose(path)``;
* ``report``: ``optax_gradhealth.report.write_report(path, 'report.png')`` (reads,
  diagnoses, draws and writes the PNG and the findings).

``--log norm`` writes a plain optax run's log instead: ``step``, ``grad/norm`` and
``loss`` only (a W&B or TensorBoard export), so that ``diagnose`` replays the guard's
spike rule over the norms (the guard's log carries its scores: no replay). ``--log xdev``
writes a data-parallel run's log: the guard's norm and the cross-device audit's metrics
of ``--devices`` devices (per-device vectors and the ``[K, K]`` pair matrices, about
``3 K^2`` columns; devices 0 and 1 read the same data), whose cost grows with ``K``.

It reports the median of ``--repeat`` runs, the ratio to the ``json`` loop, and the peak
memory each adds over the process after its imports (peak resident size ``VmHWM`` minus
the resident size before the call), next to the size of the columnar data (rows x columns x 8 bytes).
Nothing is written into the repository::

    python benchmarks/bench_host.py                      # 300k x 64, 3 repeats
    python benchmarks/bench_host.py --rows 30000 --repeat 1
    python benchmarks/bench_host.py --log norm --rows 150000 --repeat 1
    python benchmarks/bench_host.py --log xdev --devices 64 --rows 500 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def write_xdev_log(path: str, rows: int, devices: int, seed: int = 0) -> int:
    """Writes a data-parallel run's log (``gh.cross_device`` + ``gh.guard``, an audit on
    every row, rows as ``MetricLogger`` writes them): clean devices, except that devices 0
    and 1 read the same examples (a near-duplicate pair); returns its size in bytes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k = devices
    eye = np.eye(k, dtype=bool)
    with open(path, "w", encoding="utf-8") as file:
        for step in range(rows):
            cosine = np.clip(0.3 + 0.03 * rng.standard_normal((k, k)), -1, 1)
            cosine = (cosine + cosine.T) / 2
            cosine[0, 1] = cosine[1, 0] = 0.98 + 0.01 * rng.random()
            cosine[eye] = 1.0
            row = {
                "step": step,
                "loss": 1.0 / (1 + step / 100),
                "grad/norm": float(np.exp(0.1 * rng.standard_normal())),
                "xdev/audited": 1.0,
                "xdev/agreement": 0.3 + 0.02 * float(rng.standard_normal()),
                "xdev/norm_cv": 0.1,
                "xdev/device_norms": np.exp(0.1 * rng.standard_normal(k)).tolist(),
                "xdev/cosine_to_mean": (0.55 + 0.03 * rng.standard_normal(k)).tolist(),
                "xdev/pairwise_cosine": cosine.tolist(),
                "xdev/near_duplicate_pairs": np.zeros((k, k)).tolist(),
                "xdev/duplicate_pairs": np.zeros((k, k)).tolist(),
            }
            file.write(json.dumps(row) + "\n")
    return os.path.getsize(path)


def write_log(path: str, rows: int, columns: int, seed: int = 0, log: str = "guard", devices: int = 64) -> int:
    """Writes the synthetic log (``log``: ``'guard'``, ``'norm'`` for ``step``,
    ``grad/norm`` and ``loss`` only, or ``'xdev'`` for ``devices`` devices' cross-device
    metrics, :func:`write_xdev_log`; ``columns`` ignored but for ``'guard'``); returns its
    size in bytes."""
    import numpy as np

    if log == "xdev":
        return write_xdev_log(path, rows, devices, seed)
    rng = np.random.default_rng(seed)
    fixed = [
        "grad/norm",
        "grad/norm_mean",
        "grad/norm_std",
        "grad/clip_threshold",
        "grad/clipped",
        "grad/finite",
        "grad/skipped",
        "grad/spiked",
        "grad/spike_score",
        "grad/zscore",
        "grad/momentum_reset",
        "grad/rollback_recommended",
        "grad/num_nonfinite",
        "grad/num_spikes",
        "loss",
    ]
    layers = [
        f"grad/leaf_norm/blocks/{i // 6}/{['attention/query', 'attention/key', 'attention/value', 'attention/out', 'mlp/up', 'mlp/down'][i % 6]}/kernel"  # noqa: E501
        for i in range(max(columns - len(fixed), 0))
    ]
    names = (fixed + layers)[:columns]
    t = np.arange(rows)
    norm = 2.0 * np.exp(-t / rows) * np.exp(0.15 * rng.standard_normal(rows))
    spikes = rng.choice(rows, size=max(rows // 5000, 1), replace=False)
    norm[spikes] *= 20
    nonfinite = rng.choice(rows, size=max(rows // 20000, 1), replace=False)
    data = {
        "grad/norm": norm,
        "grad/norm_mean": np.full(rows, 1.5),
        "grad/norm_std": np.full(rows, 0.3),
        "grad/clip_threshold": np.full(rows, float(np.percentile(norm, 95))),
        "grad/spiked": np.isin(t, spikes).astype(float),
        "grad/spike_score": norm / 1.5,
        "grad/zscore": (norm - 1.5) / 0.3,
        "grad/momentum_reset": np.zeros(rows),
        "grad/rollback_recommended": np.zeros(rows),
        "grad/num_nonfinite": np.cumsum(np.isin(t, nonfinite)).astype(float),
        "grad/num_spikes": np.cumsum(np.isin(t, spikes)).astype(float),
        "loss": 3.0 * np.exp(-t / (rows / 3)) + 0.5 + 0.01 * rng.standard_normal(rows),
    }
    data["grad/clipped"] = (norm > data["grad/clip_threshold"]).astype(float)
    data["grad/finite"] = np.ones(rows)
    data["grad/skipped"] = data["grad/spiked"].copy()
    data["grad/norm"][nonfinite] = np.nan
    data["grad/finite"][nonfinite] = 0.0
    data["grad/skipped"][nonfinite] = 1.0
    for i, name in enumerate(layers):
        data[name] = norm * (0.05 + 0.9 * i / max(len(layers), 1)) * np.exp(0.05 * rng.standard_normal(rows))
    if log == "norm":
        names = ["grad/norm", "loss"]
    matrix = np.stack([data[name] for name in names], axis=1).tolist()
    with open(path, "w", encoding="utf-8") as file:
        for step, values in enumerate(matrix):
            row = {"step": step}
            row.update({n: "NaN" if v != v else v for n, v in zip(names, values)})  # JsonlWriter's NaN
            file.write(json.dumps(row) + "\n")
    return os.path.getsize(path)


def _status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, from
    ``/proc/self/status`` (ru_maxrss would carry the parent's peak across the exec)."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def child(task: str, path: str, out_dir: str) -> dict:
    """One measurement, in this (fresh) process."""
    if task == "json":
        rss = _status_bytes("VmRSS")
        start = time.perf_counter()
        with open(path, encoding="utf-8") as file:
            for line in file:
                json.loads(line)
        seconds = time.perf_counter() - start
    else:
        import matplotlib  # noqa: F401  (imports are not timed)

        import optax_gradhealth as gh
        from optax_gradhealth.report import write_report

        rss = _status_bytes("VmRSS")
        start = time.perf_counter()
        if task == "diagnose":
            findings = gh.diagnose(path)
        else:
            findings = write_report(path, os.path.join(out_dir, "report.png"))
        seconds = time.perf_counter() - start
        assert findings, "the planted faults (spikes and non-finite steps, or a near-duplicate pair) must be found"
    peak = _status_bytes("VmHWM")
    return {"seconds": seconds, "peak_extra_bytes": max(peak - rss, 0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--columns", type=int, default=64, help="metric columns besides the step")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--log",
        choices=("guard", "norm", "xdev"),
        default="guard",
        help="guard: the guard's metrics (default); norm: step, grad/norm and loss only (diagnose replays the rule); "
        "xdev: a data-parallel run's cross-device metrics (--devices)",
    )
    parser.add_argument("--devices", type=int, default=64, help="devices of --log xdev (default: 64)")
    parser.add_argument("--child", nargs=3, metavar=("TASK", "PATH", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "run.jsonl")
        start = time.perf_counter()
        write = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import bench_host; "
        write += f"bench_host.write_log({path!r}, {args.rows}, {args.columns}, log={args.log!r}, "
        write += f"devices={args.devices})"
        subprocess.run([sys.executable, "-c", write], check=True)  # its memory is not this process's
        size = os.path.getsize(path)
        columns = {"guard": args.columns, "norm": 2, "xdev": 3 * args.devices**2 + 2 * args.devices + 5}[args.log]
        print(f"wrote {args.rows} x {columns} columns, {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s")
        columnar = args.rows * columns * 8
        results: dict[str, list[dict]] = {"json": [], "diagnose": [], "report": []}
        for _ in range(args.repeat):
            for task in results:
                command = [sys.executable, __file__, "--child", task, path, folder]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                results[task].append(json.loads(done.stdout.strip().splitlines()[-1]))
        floor = statistics.median(r["seconds"] for r in results["json"])
        print(f"columnar data: {columnar / 1e6:.0f} MB ({args.rows} x {columns} float64)")
        print(f"{'task':10s} {'median s':>9s} {'x json':>7s} {'peak extra MB':>14s} {'x columnar':>11s}  runs (s)")
        for task, runs in results.items():
            seconds = statistics.median(r["seconds"] for r in runs)
            memory = max(r["peak_extra_bytes"] for r in runs)
            print(
                f"{task:10s} {seconds:9.2f} {seconds / floor:7.2f} {memory / 1e6:14.0f} {memory / columnar:11.2f}  "
                + ", ".join(f"{r['seconds']:.2f}" for r in runs)
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

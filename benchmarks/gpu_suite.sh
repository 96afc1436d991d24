#!/usr/bin/env bash
# The accelerator suite: the guard's cost per call and in a loop, its compile time at
# 1000 leaves, its share of a transformer's train step, the update check atomic or per
# element (benchmarks/bench_check.py), the core tests on the
# accelerator (in SHARDS pytest processes sharing it: benchmarks/sharded_pytest.sh) and,
# in the time left, what each fusion choice of _lowering buys there.
# Writes every result into OUT (one file per part, and summary.md).
#
#   bash benchmarks/gpu_suite.sh OUT            # on a machine with one GPU (about 8 min at most)
#   bash benchmarks/gpu_suite.sh OUT --small    # tiny sizes on any backend (a check of the suite)
#
# Nothing is installed: it needs jax (with CUDA), optax, flax, chex and, for the tests,
# pytest and hypothesis, already there. The project goes on PYTHONPATH. Each part has a
# time limit of its own, so a slow part cannot take the others' time; a part that runs
# out says so in summary.md. GH_SUITE_PLATFORM sets JAX_PLATFORMS (default: cuda, or
# cpu with --small).
set -u
OUT=${1:?usage: gpu_suite.sh OUT [--small]}
SMALL=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$SMALL" = "--small" ]; then
  export JAX_PLATFORMS=${GH_SUITE_PLATFORM:-cpu}
  GUARD="--params 2e5 --leaves 10 --steps 3 --warmup 1 --compile-reps 1"
  LOOP="--params 2e5 --leaves 10 --steps 2 --warmup 1 --compile-reps 1 --loop 4"
  COMPILE="--params 1e5 --leaves 50 --steps 1 --warmup 1 --compile-reps 1"
  TRAIN="--size tiny --steps 2 --warmup 1"
  CHECK="--params 2e5 --leaves 10 --steps 2 --warmup 1"
  LIMIT_GUARD=300 LIMIT_LOOP=300 LIMIT_COMPILE=300 LIMIT_TRAIN=300 LIMIT_CHECK=300 LIMIT_TESTS=900
  LOWERING="--params 2e5 --leaves 10 --steps 2 --warmup 1 --loop 2"
  BUDGET=3600
  TESTS="tests/test_backend.py tests/test_stats.py tests/test_skip.py"
  SHARDS=2
else
  export JAX_PLATFORMS=${GH_SUITE_PLATFORM:-cuda}
  GUARD="--params 4e8 --leaves 100 --steps 20 --warmup 3 --compile-reps 1"
  LOOP="--params 4e8 --leaves 100 --steps 8 --warmup 2 --compile-reps 1 --loop 10"
  # Compile time grows with the leaves, not the parameters (docs/benchmarks.md): 10M
  # parameters keep the timed steps short. (At 100M the last run's guard did not finish
  # compiling in the 34 s left after adamw's 21.9 s and optax's chain's 44.6 s.)
  COMPILE="--params 1e7 --leaves 1000 --steps 2 --warmup 1 --compile-reps 1"
  TRAIN="--size base --steps 20 --warmup 2"
  # In a loop of steps: where the issue's H200 run found the guard's 1.5 GB temporary
  # (optax's chain had none).
  LOWERING="--params 1e8 --leaves 100 --steps 6 --warmup 1 --loop 5"
  # The update check atomic (two evaluations of adamw) or per element (one): whether
  # XLA:GPU fuses the per-element check's count with its writes (docs/benchmarks.md).
  # (1e8: 400 MB per array, memory-bound as at 4e8, and the inputs are drawn in 1/4 of the time.)
  CHECK="--params 1e8 --leaves 100 --steps 10 --warmup 2"
  BUDGET=480  # seconds for the whole suite: the last part, lowering, gets what is left
  LIMIT_GUARD=80 LIMIT_LOOP=80 LIMIT_COMPILE=130 LIMIT_TRAIN=60 LIMIT_CHECK=45 LIMIT_TESTS=100
  # In the order that spreads them evenly over the shards (round-robin; test counts
  # 45 57 44 44 43 41 28 16 12 12 1).
  TESTS="tests/test_stats.py tests/test_clipping.py tests/test_guard.py tests/test_guard_inplace.py \
tests/test_loss_scale.py tests/test_clip_modes.py tests/test_update_health.py tests/test_skip.py \
tests/test_accumulation.py tests/test_replay.py tests/test_backend.py"
  SHARDS=4  # pytest processes sharing the GPU: compiling, most of a test's time there, runs on the host's cores
fi
cd "$ROOT" || exit 1
SUMMARY="$OUT/summary.md"
{
  echo "# gpu_suite $(date -u +%Y-%m-%dT%H:%MZ) ${SMALL:-full}"
  echo
  python -c "import jax, optax, flax; d = jax.devices()[0]; print(f'jax {jax.__version__}, optax {optax.__version__}, flax {flax.__version__}; backend {jax.default_backend()}, {len(jax.devices())} x {d.device_kind}')" 2>&1
  echo
} >"$SUMMARY"

part() {  # part NAME LIMIT COMMAND...: runs it under its limit, output into OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.txt" 2>"$OUT/$name.err"
  local status=$?
  local took=$((SECONDS - start))
  if [ $status -eq 124 ] || [ $status -eq 137 ]; then
    echo "## $name: ran out of its ${limit} s limit (${took} s)" >>"$SUMMARY"
    grep -E '^  compiled ' "$OUT/$name.err" >>"$SUMMARY"  # the compile times it did measure
  elif [ $status -ne 0 ]; then
    echo "## $name: failed (exit $status, ${took} s); last lines of $name.err:" >>"$SUMMARY"
    tail -n 5 "$OUT/$name.err" | sed 's/^/    /' >>"$SUMMARY"
  else
    echo "## $name (${took} s)" >>"$SUMMARY"
  fi
  grep -E '^(\||jax |transformer|### shard|FAILED|ERROR|[0-9]+ (passed|failed)|=+ .*(passed|failed))' "$OUT/$name.txt" >>"$SUMMARY"
  echo >>"$SUMMARY"
}

# shellcheck disable=SC2086  # the argument lists are meant to split
VARIANTS=("clip+adamw" "apply_if_finite" "guard (all on)" "guard, update_health=False")
part guard_per_call "$LIMIT_GUARD" python benchmarks/bench_guard.py $GUARD --json "$OUT/guard_per_call.json" \
  --variants "${VARIANTS[@]}"
part guard_loop "$LIMIT_LOOP" python benchmarks/bench_guard.py $LOOP --json "$OUT/guard_loop.json" \
  --variants "${VARIANTS[@]}"
part compile_1000_leaves "$LIMIT_COMPILE" python benchmarks/bench_guard.py $COMPILE --json "$OUT/compile.json" \
  --variants "guard (all on)"
part train_step "$LIMIT_TRAIN" python benchmarks/bench_train_step.py $TRAIN --json "$OUT/train_step.json"
part check "$LIMIT_CHECK" python benchmarks/bench_check.py $CHECK
if python -c "import pytest, hypothesis" 2>/dev/null; then
  part tests "$LIMIT_TESTS" bash benchmarks/sharded_pytest.sh "$SHARDS" $TESTS
else
  echo "## tests: not run (pytest or hypothesis is not installed)" >>"$SUMMARY"
fi
# What each fusion choice of _lowering buys on this backend (each turned off in turn).
LEFT=$((BUDGET - SECONDS))
if [ "$LEFT" -ge 30 ]; then
  part lowering "$LEFT" python benchmarks/bench_lowering.py $LOWERING
else
  echo "## lowering: not run (${LEFT} s left of the suite's ${BUDGET} s)" >>"$SUMMARY"
fi
cat "$SUMMARY"

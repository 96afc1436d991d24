#!/usr/bin/env bash
# Runs test files in N pytest processes at once, sharing one accelerator (its memory
# allocated on demand, not preallocated per process), and prints each shard's output
# in turn. On an accelerator most of a test's time is compiling, which runs on the
# host's cores: N processes make use of them. Used by gpu_suite.sh.
#
#   bash benchmarks/sharded_pytest.sh N FILE...
#
# Exits non-zero when any shard fails. Killed (TERM), it stops every shard and still
# prints what they wrote.
set -u
SHARDS=${1:?usage: sharded_pytest.sh N FILE...}
shift
LOGS=$(mktemp -d)
pids=()
report() {
  for log in "$LOGS"/shard_*.txt; do
    echo "### $(basename "$log" .txt): $(head -n 1 "$log.files")"
    cat "$log"
    echo
  done
}
stop() {
  kill "${pids[@]}" 2>/dev/null
  wait
  report
  exit 124
}
trap stop TERM INT
for ((k = 0; k < SHARDS; k++)); do
  files=()
  i=0
  for f in "$@"; do  # round-robin: shard k takes files k, k + N, ...
    if ((i % SHARDS == k)); then files+=("$f"); fi
    i=$((i + 1))
  done
  [ ${#files[@]} -eq 0 ] && continue
  echo "${files[*]}" >"$LOGS/shard_$k.txt.files"
  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m pytest -q -rfE -p no:cacheprovider -o addopts="" "${files[@]}" \
    >"$LOGS/shard_$k.txt" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
report
exit $status

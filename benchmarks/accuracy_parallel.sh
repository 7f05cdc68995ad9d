#!/usr/bin/env bash
# The whole accuracy benchmark (tables A, B, C; seeds 0-2) as parallel processes that share
# one machine, e.g. a GPU that one process cannot keep busy; then one merged results file.
#
#   benchmarks/accuracy_parallel.sh [DATA] [extra accuracy.py options, e.g. --quick]
#
# DATA defaults to ../shared/datasets. Work and logs go to $OUT (default runs/parallel, or
# runs/parallel-quick with --quick); the merged tables to $RESULTS (default
# benchmarks/results/accuracy.json, or accuracy-quick.json with --quick). Finished runs are
# never redone: a run already in a process's file in $OUT is skipped when the script is
# started again, and a run already in $RESULTS is kept as it is (use a new RESULTS file to
# replace it). Two phases: the rows that start from another run's
# checkpoint (domain pre-training from B1, B2 or B3, test-time flip, a teacher) wait until that
# run is done (C26 needs C23 of phase 1, C38 and C39 need C31); within phase 2 a row runs
# after the rows it needs (C22 after C21, C43 after the soup C40, after C39).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/datasets}
shift || true
quick=""
for arg in "$@"; do [ "$arg" != --quick ] || quick=-quick; done
OUT=${OUT:-runs/parallel$quick}  # a smoke run never writes into the full runs' files
RESULTS=${RESULTS:-benchmarks/results/accuracy$quick.json}
mkdir -p "$OUT"
# ten processes at once in phase 1: share the CPUs instead of each taking all of them
cpus=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus >= 8 ? cpus / 8 : 1))}
bench() {  # bench NAME ARGS...: one accuracy.py process with its own results file and log
    local name=$1
    shift
    python benchmarks/accuracy.py --data "$DATA" --runs-dir "$OUT/runs" \
        --results "$OUT/$name.json" "$@" >"$OUT/$name.log" 2>&1 ||
        { echo "$name failed: see $OUT/$name.log" >&2; return 1; }
}
# rows that need a finished run's checkpoint (a B row's backbone, a flip, a teacher, a soup)
later=("(B1)" "(B2)" "(B3)" B8 B11 C17 C20 C22 C26 C38 C39 C43 "test-time flip" "model soup")
once=(A1 C1 C2)                 # not trained: one run, whatever the seed

echo "phase 1: B1-B9, B11 and every row that starts from ImageNet weights"
pids=()
bench b1 --tables B --only B1 --seeds 0 "$@" & pids+=($!)  # one seed each: the big runs
bench b2 --tables B --only B2 --seeds 0 "$@" & pids+=($!)
# B6-B9 and B11 (flips of B3 and B4; B8 taught by B4, B11 by B8) after the runs they
# need, in the same process
bench b3 --tables B --only B3 B4 B5 B6 B7 B8 B9 B11 --seeds 0 "$@" & pids+=($!)
bench b4 --tables B --only B4 --seeds 1 2 "$@" & pids+=($!)  # for B10, B4's ensemble
for seed in 0 1 2; do
    skip=("${later[@]}")
    [ "$seed" = 0 ] || skip+=("${once[@]}")
    bench "a$seed" --tables A --seeds "$seed" --skip "${skip[@]}" "$@" & pids+=($!)
    bench "c$seed" --tables C --seeds "$seed" --skip "${skip[@]}" "$@" & pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
[ "$failed" = 0 ] || exit 1

echo "phase 2: the rows that start from another run's backbone or checkpoints"
pids=()
for seed in 0 1 2; do
    python benchmarks/accuracy.py --results "$OUT/p$seed.json" --merge "$OUT"/b?.json \
        "$OUT/a$seed.json" "$OUT/c$seed.json" >/dev/null
    bench "p$seed" --tables A C --seeds "$seed" --only "${later[@]}" "$@" & pids+=($!)
done
python benchmarks/accuracy.py --results "$OUT/pb.json" --merge "$OUT"/b?.json >/dev/null
bench pb --tables B --seeds 0 --only B10 "$@" & pids+=($!)
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
[ "$failed" = 0 ] || exit 1

python benchmarks/accuracy.py --results "$RESULTS" --merge "$OUT"/b?.json "$OUT"/a?.json \
    "$OUT"/c?.json "$OUT"/p?.json

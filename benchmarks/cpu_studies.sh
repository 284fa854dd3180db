#!/usr/bin/env bash
# Every CPU study run the issues read, one after the other (a 2-core machine runs one torch process well at a
# time: two at once thrash each other's threads), each logged to runs/<name>.log, with a time stamp per run in
# runs/cpu_studies.log:
#   1. recipes/study_cifar10_cpu.yaml      the shared base and the plain / uniform / multibranch / scratch points
#   2. recipes/study_cifar10_cpu_new.yaml  plain-latency, plain-rebranch, plain-ranking on that base
#      (both run two seeds of every point, `study.seeds: 2`; step 3, a second seed of the keep-0.3 points in
#      runs of their own, is part of them now)
#   4. plain at keep 0.3 with prune.min_width 16 and 32, two seeds each (runs/mw16, runs/mw32)
#   5. recipes/study_cifar10_cpu_budget.yaml  prune or retrain
#   6. recipes/cifar10_a0_cpu.yaml          the yardstick: the budget recipe must finish within 4x its wall time
# Finished points are reused, so a rerun after an interruption picks up where it stopped.
#
#   bash benchmarks/cpu_studies.sh [STEP ...]    # which steps (run in the order listed above); default all
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STEPS=" ${*:-1 2 4 5 6} "
mkdir -p runs

run() {  # run NAME ARGS...: one compress.py run, logged
    local name=$1; shift
    echo "=== $(date +%T) start $name" >> runs/cpu_studies.log
    local t0=$SECONDS
    "$PY" compress.py "$@" > "runs/$name.log" 2>&1
    local rc=$?
    echo "=== $(date +%T) $name rc=$rc ($((SECONDS - t0)) s)" >> runs/cpu_studies.log
    return $rc
}

step() { [[ $STEPS == *" $1 "* ]]; }

BASE=runs/study_cifar10_cpu
NEW=runs/study_cifar10_cpu_new
step 1 && { run study_cpu --recipe recipes/study_cifar10_cpu.yaml --out $BASE || exit 1; }
step 2 && { run study_new --recipe recipes/study_cifar10_cpu_new.yaml --out $NEW || exit 1; }
if step 4; then
    for mw in 16 32; do
        run mw$mw --recipe recipes/study_cifar10_cpu.yaml --out runs/mw$mw --set study.seeds=2 \
            --set 'study.keep_macs=[0.3]' --set 'study.strategies=[plain]' --set prune.min_width=$mw \
            --set study.base_dir=$BASE || exit 1
    done
fi
step 5 && { run study_budget --recipe recipes/study_cifar10_cpu_budget.yaml --out runs/study_cifar10_cpu_budget || exit 1; }
step 6 && { run cifar10_a0_cpu --recipe recipes/cifar10_a0_cpu.yaml --out runs/cifar10_a0_cpu || exit 1; }
echo "=== $(date +%T) done" >> runs/cpu_studies.log

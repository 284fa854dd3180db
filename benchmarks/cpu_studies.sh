#!/usr/bin/env bash
# The CIFAR-10 CPU studies, one after the other, each then published into docs/results/ by `compress.py report`
# (the report's header names the command that measured it, the date, the CPU and the package versions):
#
#   step  run (run directory)                            what it measures                    report
#   1     recipes/study_cifar10_cpu.yaml                 the shared base; plain, uniform,    docs/results/study_cifar10_cpu.md
#         (runs/study_cifar10_cpu)                       multibranch and scratch points
#   2     recipes/study_cifar10_cpu_new.yaml             plain-latency, plain-rebranch,      docs/results/study_cifar10_cpu_new.md
#         (runs/study_cifar10_cpu_new)                   plain-ranking on step 1's base
#   3     study_cifar10_cpu at keep 0.3, plain, with     what a width floor costs            docs/results/study_cifar10_cpu_mw16.md
#         prune.min_width 16 and 32, two seeds each                                          docs/results/study_cifar10_cpu_mw32.md
#         (runs/mw16, runs/mw32)
#   4     recipes/study_cifar10_cpu_budget.yaml          prune or retrain, at equal added    docs/results/study_cifar10_cpu_budget.md
#         (runs/study_cifar10_cpu_budget)                and equal total training images
#   5     recipes/cifar10_a0_cpu.yaml                    one pipeline run of the A0 recipe:  docs/results/cifar10_a0_cpu.md
#         (runs/cifar10_a0_cpu)                          the wall-time yardstick of a study
#
# Needs CIFAR-10 under data/cifar10 (the recipes' data.root). Runs take hours to days on a small CPU: each is logged to
# runs/<name>.log, with start and end times in runs/cpu_studies.log. One run at a time, because on a few cores two
# torch processes thrash each other's threads. Finished points and stages are reused, so a rerun after an interruption
# picks up where it stopped; a finished run is only re-reported.
#
#   bash benchmarks/cpu_studies.sh [STEP ...]    # the steps to run, in the order above; default all
#   PYTHON=/path/to/python bash benchmarks/cpu_studies.sh 4
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STEPS=" ${*:-1 2 3 4 5} "
mkdir -p runs docs/results

# run NAME DIR --recipe R [--set ...]: one compress.py run into DIR, logged to runs/NAME.log, then its report into
# docs/results/NAME.md (given the recipe and overrides too, for a run directory that records none)
run() {
    local name=$1 dir=$2; shift 2
    echo "=== $(date +%T) start $name" >> runs/cpu_studies.log
    local t0=$SECONDS
    "$PY" compress.py --out "$dir" "$@" > "runs/$name.log" 2>&1
    local rc=$?
    echo "=== $(date +%T) $name rc=$rc ($((SECONDS - t0)) s)" >> runs/cpu_studies.log
    [ $rc -eq 0 ] || return $rc
    "$PY" compress.py report "$dir" --to "docs/results/$name.md" "$@" > /dev/null
}

step() { [[ $STEPS == *" $1 "* ]]; }

BASE=runs/study_cifar10_cpu
step 1 && { run study_cifar10_cpu $BASE --recipe recipes/study_cifar10_cpu.yaml || exit 1; }
step 2 && { run study_cifar10_cpu_new runs/study_cifar10_cpu_new --recipe recipes/study_cifar10_cpu_new.yaml || exit 1; }
if step 3; then
    for mw in 16 32; do
        run study_cifar10_cpu_mw$mw runs/mw$mw --recipe recipes/study_cifar10_cpu.yaml --set study.seeds=2 \
            --set 'study.keep_macs=[0.3]' --set 'study.strategies=[plain]' --set prune.min_width=$mw \
            --set study.base_dir=$BASE || exit 1
    done
fi
step 4 && { run study_cifar10_cpu_budget runs/study_cifar10_cpu_budget --recipe recipes/study_cifar10_cpu_budget.yaml \
            || exit 1; }
step 5 && { run cifar10_a0_cpu runs/cifar10_a0_cpu --recipe recipes/cifar10_a0_cpu.yaml || exit 1; }
echo "=== $(date +%T) done" >> runs/cpu_studies.log

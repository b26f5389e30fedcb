#!/usr/bin/env bash
# Paper-scale CIFAR-10 runs on one GPU: the DER table (benchmarks/suites/seq_cifar10_der.yaml) and the stability-gap
# and view-batch runs (benchmarks/suites/gpu_paper_scale.yaml), several runs side by side on the one device.
#
#   CLFRAME_DATA=/path/to/data bash benchmarks/gpu_paper_scale.sh            # everything, 4 runs at a time
#   JOBS=6 SEEDS_ONLY=0 bash benchmarks/gpu_paper_scale.sh                    # more at once
#   DRY_RUN=1 bash benchmarks/gpu_paper_scale.sh                              # print the commands (CPU check)
#   THROUGHPUT=0 bash benchmarks/gpu_paper_scale.sh                           # without the throughput run first
#
# A stopped invocation (time limit, pre-emption) is resumed by running it again: finished runs are skipped and
# interrupted ones restart from their last checkpoint. Each full run is about 78k optimiser steps (DER table,
# view-batch) or 2k steps each followed by a continual evaluation (stability gap). Reports land in
# runs/bench/<suite>/report (and under $OUT when that is set).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-4}"
extra=()
[[ "${DRY_RUN:-0}" == 1 ]] && extra+=(--dry-run)
if [[ "${THROUGHPUT:-1}" == 1 ]]; then  # images/s of clframe against plain loops (benchmarks/gpu_throughput.py), ~5 min
  cmd=(timeout 540 python benchmarks/gpu_throughput.py --device cuda --out "${OUT:-benchmarks/results}/gpu_throughput")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${cmd[*]}"; else "${cmd[@]}" || echo "the throughput run stopped early"; fi
fi
for suite in benchmarks/suites/seq_cifar10_der.yaml benchmarks/suites/gpu_paper_scale.yaml; do
  clframe bench "$suite" --jobs "$JOBS" "${extra[@]}" || echo "some runs of $suite did not finish; run again to resume"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    clframe report "$suite" || true
    if [[ -n "${OUT:-}" ]]; then
      name="$(basename "$suite" .yaml)"
      cp "runs/bench/$name/report/"*.md "$OUT/" 2>/dev/null || true
    fi
  fi
done

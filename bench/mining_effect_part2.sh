#!/usr/bin/env bash
# Part 2 of the mining-effect experiment (docs/mining_effect.md), resumable across sessions and hosts.
#
#   bash bench/mining_effect_part2.sh            # WORK=../runs/effect_arms by default, one run at a time
#   SEEDS="15 14 13 12" bash bench/mining_effect_part2.sh &   # a second worker (one per core): a run another
#                                                             # worker holds (its lock) is skipped
#
# Finished runs are kept, compact, in docs/mining_effect_part2/runs (commit them): they are copied into the
# work directory first, so the bench skips them. Order: seed-major over uniform, its replicate, the oracle and
# `loss` for all 16 seeds, then the rest of the planned family and the compute-saving pair. One worker, one
# torch thread, the CPU's vector ISA pinned (the bench's default), so every run repeats on another host.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-../runs/effect_arms}
KEEP=docs/mining_effect_part2/runs
mkdir -p "$WORK/runs" "$KEEP"
for f in "$KEEP"/seed-*.json; do [ -e "$f" ] && [ ! -e "$WORK/runs/$(basename "$f")" ] && cp "$f" "$WORK/runs/"; done
SEEDS=${SEEDS:-$(seq 0 15)}
run() {
  local done="$WORK/runs/seed-$1-$2.json"
  [ -e "$done" ] && return 0
  # One worker per run (a run another worker holds is skipped). Two workers meet on a seed only after its
  # data directory is written, by the first run of that seed, so start the second at the other end of the seeds.
  flock -n "$WORK/runs/seed-$1-$2.lock" env OMP_NUM_THREADS=1 "$PY" bench/mining_effect.py --preset finetune \
    --seeds "$1" --arms "$2" --jobs 1 --threads 1 --no-report --out "$WORK" || return 0
  # Compact, with the slice mix of the run's last hard set (read from its plans while the work directory has
  # them); written whole, then renamed: a killed copy leaves no cut file in the kept runs.
  [ -e "$done" ] && "$PY" bench/mining_effect_report.py "$WORK" --keep "$KEEP"
}
for s in $SEEDS; do for a in uniform uniform_replicate oracle loss; do run "$s" "$a"; done; done
for s in $SEEDS; do for a in dynamic label_loss coord_loss det_f1 fixed_set_60 uniform_60; do run "$s" "$a"; done; done

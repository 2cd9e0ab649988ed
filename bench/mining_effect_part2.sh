#!/usr/bin/env bash
# Part 2 of the mining-effect experiment (docs/mining_effect.md), resumable across sessions and hosts.
#
#   bash bench/mining_effect_part2.sh            # one run at a time, in ../runs/effect_arms/<cpu model>
#   SEEDS="$(seq 15 -1 0)" bash bench/mining_effect_part2.sh &   # a second worker (one per core), from the other
#                                                                # end: a run another worker holds (its lock) is skipped
#
# A run repeats on one CPU model (the vector ISA pinned), not across vendors, so every run is paired with uniform's
# run of the same seed on the same CPU model. Finished runs are kept, compact, in
# docs/mining_effect_part2/runs/<cpu model>/ (commit them); this model's are copied into the work directory first,
# so the bench skips them. An (arm, seed) is run once, on whichever model gets to it first; uniform, the control,
# runs once per seed on every model that runs another arm of that seed, before it. Order: seed-major over uniform,
# its replicate, the oracle and `loss` for all 16 seeds, then arm-major over the rest of the planned family and the
# compute-saving pair (ARMS= picks and orders them). One worker, one torch thread, the CPU's vector ISA pinned
# (the bench's default).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
HOST=$("$PY" bench/mining_effect_report.py . --host)
WORK=${WORK:-../runs/effect_arms/$HOST}
KEPT=docs/mining_effect_part2/runs
KEEP=$KEPT/$HOST
mkdir -p "$WORK/runs" "$KEEP"
for f in "$KEEP"/seed-*.json; do [ -e "$f" ] && [ ! -e "$WORK/runs/$(basename "$f")" ] && cp "$f" "$WORK/runs/"; done
SEEDS=${SEEDS:-$(seq 0 15)}

kept() {  # seed arm: kept on any CPU model
  compgen -G "$KEPT/*/seed-$1-$2.json" >/dev/null
}

run() {  # seed arm: run it here under its lock; fails when another worker holds it or it did not finish
  local done="$WORK/runs/seed-$1-$2.json"
  [ -e "$done" ] && return 0
  # One worker per run. Two workers meet on a seed only after its data directory is written, by the first run
  # of that seed, so start the second at the other end of the seeds.
  flock -n "$WORK/runs/seed-$1-$2.lock" env OMP_NUM_THREADS=1 "$PY" bench/mining_effect.py --preset finetune \
    --seeds "$1" --arms "$2" --jobs 1 --threads 1 --no-report --out "$WORK" || true
  [ -e "$done" ] || return 1
  # Compact, with the slice mix of the run's last hard set (read from its plans while the work directory has
  # them); written whole, then renamed: a killed copy leaves no cut file in the kept runs.
  "$PY" bench/mining_effect_report.py "$WORK" --keep "$KEEP"
}

arm() {  # seed arm: unless kept somewhere, run this model's uniform of the seed (the control), then the arm
  kept "$1" "$2" && return 0
  [ "$2" = uniform ] || run "$1" uniform || return 0
  run "$1" "$2" || true
}

# Controls first: a seed with an arm kept on this model but no uniform here (an arm run before pairing by model).
for f in "$KEEP"/seed-*.json; do
  [ -e "$f" ] || continue
  s=${f##*/seed-}; s=${s%%-*}
  [ -e "$KEEP/seed-$s-uniform.json" ] || run "$s" uniform || true
done
for s in $SEEDS; do for a in uniform uniform_replicate oracle loss; do arm "$s" "$a"; done; done
# The rest arm by arm, so that each arm completes (and is read) as early as it can, the cheap ones first (det_f1
# also generates on the train set at each epoch end); within an arm, the seeds whose uniform this model already ran
# come first (a seed new to this model costs one more uniform).
ours=(); others=()
for s in $SEEDS; do
  if [ -e "$KEEP/seed-$s-uniform.json" ]; then ours+=("$s"); else others+=("$s"); fi
done
for a in ${ARMS:-label_loss coord_loss det_f1 dynamic fixed_set_60 uniform_60 fixed_set_60_cover}; do
  for s in "${ours[@]}" "${others[@]}"; do arm "$s" "$a"; done
done

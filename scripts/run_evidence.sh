#!/usr/bin/env bash
# The book's evidence (chapter 9), from one committed code version, on 2 CPU cores:
#   1. the 51-pattern sweep at seed 0: every arm under both retraining protocols (1% and 50%),
#      Neural Cleanse and the random-patch control;
#   2. seeds 1 and 2 on 12 patterns (the 4 weakest attacks of seed 0 and 8 more), light:
#      MESA, the point starts and the oracle under the headline protocol;
#   3. the false-positive control: MESA's scan and Neural Cleanse on 10 clean models.
# Each step resumes where it stopped (the sweep files are their own state). The model
# cache is a fresh folder unless MESA_CACHE_DIR is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-book/results}
export MESA_CACHE_DIR=${MESA_CACHE_DIR:-$(mktemp -d)}
if [ -n "$(git status --porcelain -- mesa_lib)" ]; then
  echo "mesa_lib has uncommitted changes: commit first, so the results name one code version" >&2
  exit 2
fi
EXTRA_PATTERNS=${EXTRA_PATTERNS:-}
t0=$(date +%s)
$PY -m mesa_lib sweep --patterns all --workers 2 --out "$OUT/sweep_fashion-mnist_fast.jsonl"
if [ -z "$EXTRA_PATTERNS" ]; then
  EXTRA_PATTERNS=$($PY - "$OUT/sweep_fashion-mnist_fast.jsonl" <<'PYEOF'
import sys
from mesa_lib.sweep import load_sweep
lines = load_sweep(sys.argv[1])
by_asr = sorted(lines, key=lambda l: l["backdoored"]["asr"])
weakest = [l["pattern"] for l in by_asr[:4]]
rest = [l["pattern"] for l in lines if l["pattern"] not in weakest]
step = len(rest) / 8
print(",".join(map(str, weakest + [rest[int(i * step)] for i in range(8)])))
PYEOF
)
fi
echo "extra seeds on patterns $EXTRA_PATTERNS"
for seed in 1 2; do
  $PY -m mesa_lib sweep --light --seed $seed --patterns "$EXTRA_PATTERNS" --workers 2 \
    --out "$OUT/sweep_fashion-mnist_fast_seed$seed.jsonl"
done
CONTROLS="$OUT/clean_controls_fashion-mnist_fast.json"
if [ -f "$CONTROLS" ]; then  # done already: clean-controls never replaces a results file (it needs --force)
  echo "$CONTROLS exists: the clean-model control is done (move it away to redo it)"
else
  $PY -m mesa_lib clean-controls --seeds 0-9 --workers 2 --out "$CONTROLS"
fi
echo "evidence done in $(( $(date +%s) - t0 )) s"

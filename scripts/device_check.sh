#!/usr/bin/env bash
# The book's GPU check, in one lease of a GPU machine that has PyTorch but no internet.
#
#   bash scripts/device_check.sh bench       # the GPU benchmarks + one short notebook (~2-3 min)
#   bash scripts/device_check.sh notebooks   # every notebook of _toc.yml, on the GPU (~5-7 min)
#   bash scripts/device_check.sh notebooks book/09_reproduction.ipynb   # some of them
#
# What it needs beside the working tree (both ignored by git, carried to the machine):
#   .whl/      wheels (Python of that machine) of the notebook machinery the machine lacks:
#              nbclient, nbformat, ipykernel, ipywidgets, jupyter-cache, myst-nb and their needs
#   .devdata/  the four Fashion-MNIST IDX files (MESA_DATA_DIR)
# Results go to $OUT (default /tmp/device_out): benchmark JSONs, the notebooks' times, the
# executed notebooks (one archive), and the logs. bench/results/ and book/results/ take the
# files that the book reads; this script writes nothing in the working tree but _build/.
set -uo pipefail
stage=${1:?usage: device_check.sh bench|notebooks}
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && touch /tmp/site/.installed || { echo "wheel install failed"; exit 3; }
fi
export MESA_DATA_DIR="$PWD/.devdata" MESA_CACHE_DIR=/tmp/mesa_cache MESA_STRICT_DEVICE=0
python3 - <<'EOF' | tee "$OUT/machine_$stage.json"
import json, os, platform, torch
from mesa_lib.common import code_fingerprint
print(json.dumps({"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                  "code": code_fingerprint(), "git": os.environ.get("MESA_GIT_COMMIT")}))
EOF

case "$stage" in
bench)
    python3 bench/bench_gpu.py --out "$OUT/bench_gpu_paper.json" > "$OUT/bench.log" 2>&1 \
        && python3 bench/bench_gpu.py --bf16 --channels-last --out "$OUT/bench_gpu_paper_bf16.json" >> "$OUT/bench.log" 2>&1 \
        && python3 bench/bench_step_variants.py --device cuda --out "$OUT/step_variants_gpu.json" >> "$OUT/bench.log" 2>&1
    rc=$?
    tail -n 5 "$OUT/bench.log"
    # the notebook machinery works on this machine: the shortest chapter, once
    python3 scripts/notebooks.py --jobs 1 book/10_exercises.ipynb 2>&1 | tail -n 20
    exit $(( rc || PIPESTATUS[0] ))
    ;;
notebooks)
    shift
    rm -rf /tmp/executed
    python3 scripts/notebooks.py --jobs "${JOBS:-4}" --executed /tmp/executed "$@" 2>&1 | tee "$OUT/notebooks.log"
    rc=${PIPESTATUS[0]}
    cp _build/notebook_times.json "$OUT/notebook_times.json" 2>/dev/null
    tar -czf "$OUT/executed_notebooks.tar.gz" -C /tmp executed 2>/dev/null
    exit "$rc"
    ;;
*)
    echo "unknown stage $stage: use bench or notebooks" >&2; exit 2 ;;
esac

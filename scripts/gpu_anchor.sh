#!/usr/bin/env bash
# The performance anchor (scripts/gpu_anchor.py) on a lent GPU machine, which has torch, transformers, accelerate
# and peft but not hydra/omegaconf (the anchor needs neither). When its transformers is not the 5.x this project is
# tested with, the wheels carried in $CARRY (made here by `--prepare`) are installed into a temporary folder first.
# Figures land in $OUT (anchor.md, anchor.json).
#
#   scripts/gpu_anchor.sh --prepare            # here: download the wheels into outputs/anchor_carry (carry it)
#   SMALL=1 scripts/gpu_anchor.sh              # here: the whole script on the CPU with tiny sizes
#   scripts/gpu_anchor.sh                      # there
set -euo pipefail
CARRY=${CARRY:-outputs/anchor_carry}
OUT=${OUT:-outputs/gpu_anchor}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"

if [[ "${1:-}" == "--prepare" ]]; then
    version() { $PYTHON -c "import $1; print($1.__version__)"; }
    rm -rf "$CARRY" && mkdir -p "$CARRY"
    $PYTHON -m pip download -q --no-deps --only-binary=:all: -d "$CARRY" "transformers==$(version transformers)" \
        "huggingface_hub==$(version huggingface_hub)" "tokenizers==$(version tokenizers)" \
        "safetensors==$(version safetensors)" "peft==$(version peft)"
    du -sh "$CARRY"
    exit 0
fi

if ! $PYTHON -c "import transformers, peft, sys; sys.exit(int(transformers.__version__.split('.')[0]) < 5)" 2>/dev/null; then
    site=$(mktemp -d)
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --target "$site" "$CARRY"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"  # ptv2 from the checkout, uninstalled
$PYTHON scripts/gpu_anchor.py ${SMALL:+--small} --out "$OUT"

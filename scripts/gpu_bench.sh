#!/usr/bin/env bash
# ptv2's step time and peak memory against fine-tuning and the other methods at the size of the task presets'
# backbone, in one go on a lent GPU machine (the `bench` part of scripts/gpu_evidence.sh; with PACK=1, its `pack`
# part): `ptv2 bench` on a random-init RoBERTa-large shape (config.json only, no weights, no tokenizer), bf16
# autocast, batch 32 x length 128, prompt length 128, every method in its own process.
# Run from the repository root; what the device lacks travels in $CARRY (scripts/gpu_env.sh). Figures land in $OUT
# (the device tool brings that folder back).
#
#   scripts/gpu_bench.sh --prepare                 # here: fill outputs/gpu_carry (carry it to the device;
#                                                  # outputs/gpu_carry_b is only needed for backbone=minilm)
#   SMALL=1 scripts/gpu_bench.sh                   # here: the whole script on the CPU with tiny sizes
#   scripts/gpu_bench.sh                           # there
#   PACK=1 scripts/gpu_bench.sh                    # there: the packed-sweep benchmarks instead (below)
set -euo pipefail
OUT=${OUT:-outputs/gpu_bench}
source "$(dirname "$0")/gpu_env.sh"
mkdir -p "$OUT"
if [[ "${1:-}" == "--prepare" ]]; then gpu_carry_prepare; exit 0; fi
gpu_activate "$OUT/environment.txt"

# RoBERTa-large's published hyper-parameters (random init needs nothing else). SMALL=1 shrinks everything.
mkdir -p "$work/roberta-large"
if [[ -n "${SMALL:-}" ]]; then shape='"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128'
else shape='"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096'; fi
cat >"$work/roberta-large/config.json" <<JSON
{"architectures": ["RobertaForMaskedLM"], "model_type": "roberta", $shape, "hidden_act": "gelu",
 "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 514,
 "type_vocab_size": 1, "vocab_size": 50265, "layer_norm_eps": 1e-05, "initializer_range": 0.02,
 "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}
JSON

if [[ -n "${SMALL:-}" ]]; then sizes=(bench.batch_size=2 bench.seq_length=16 bench.prompt_length=4 bench.steps=2
    bench.warmup_steps=1 bench.eval_batches=1 bench.eval_batch_size=2)
else sizes=(bench.batch_size=32 bench.seq_length=128 bench.prompt_length=128 bench.steps=10 bench.warmup_steps=3
    bench.eval_batches=5 bench.eval_batch_size=64); fi
common=(backbone=roberta-large "backbone.name_or_path=$work/roberta-large" backbone.random_init=true
    trainer.precision=bf16 "${sizes[@]}")
if [[ -n "${PACK:-}" ]]; then
    # Packed sweeps: K ptv2 jobs on one backbone (each batch as K x 32 rows) vs the same K jobs one after another,
    # same steps each, each side in its own process. Targets: RoBERTa-large shape, prefix 128, K=8: wall <= 0.35x;
    # MiniLM shape (random init, BERT 6 x 384), K=16: wall <= 0.2x. Peak memory: max_memory_allocated.
    mkdir -p "$work/minilm"
    if [[ -n "${SMALL:-}" ]]; then mini='"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64'
        k_large=2 k_mini=3
    else mini='"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536'
        k_large=${K_LARGE:-8} k_mini=${K_MINI:-16}; fi
    cat >"$work/minilm/config.json" <<JSON
{"architectures": ["BertModel"], "model_type": "bert", $mini, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
 "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2, "vocab_size": 30522,
 "layer_norm_eps": 1e-12, "initializer_range": 0.02, "pad_token_id": 0}
JSON
    $PYTHON -m ptv2 bench "${common[@]}" bench.pack=$k_large hydra.run.dir="$work/pack_large" | tee "$OUT/pack_roberta_large.txt"
    cp "$work/pack_large/bench.json" "$OUT/pack_roberta_large.json"
    $PYTHON -m ptv2 bench backbone=minilm "backbone.name_or_path=$work/minilm" backbone.random_init=true \
        trainer.precision=bf16 "${sizes[@]}" bench.pack=$k_mini hydra.run.dir="$work/pack_minilm" | tee "$OUT/pack_minilm.txt"
    cp "$work/pack_minilm/bench.json" "$OUT/pack_minilm.json"
    exit 0
fi
# 1. every method, fp32 weights + bf16 autocast for all (the like-for-like comparison)
$PYTHON -m ptv2 bench "${common[@]}" hydra.run.dir="$work/run_all" | tee "$OUT/bench_all.txt"
cp "$work/run_all/bench.json" "$OUT/bench_all.json"
# 2. frozen backbones stored in bf16 (they need no fp32 master weights); fine-tuning keeps fp32 weights
$PYTHON -m ptv2 bench "${common[@]}" "bench.methods=[ptv2,finetune]" bench.frozen_dtype=bfloat16 \
    hydra.run.dir="$work/run_bf16" | tee "$OUT/bench_frozen_bf16.txt"
cp "$work/run_bf16/bench.json" "$OUT/bench_frozen_bf16.json"

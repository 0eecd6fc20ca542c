"""Performance anchor (the `decoder` part of scripts/gpu_evidence.sh): ptv2 deep prompts against what a user would
pick instead, PEFT LoRA and PEFT prefix tuning, on a Llama-shaped random-init model (Llama-3.2-1B's shape: 1.24 B
parameters) in bf16, batch 8 x 512, so ptv2's step time and peak memory on a decoder are read next to theirs.

Every arm trains the same causal-LM loss over all tokens through the same frozen bf16 backbone and LM head; only the
adaptation differs: ptv2 prefix 128 on every layer (fp32 prompt, AdamW), LoRA r=8 on q/k/v/o (alpha 16, no
dropout), PEFT prefix tuning with 128 virtual tokens. Each arm runs in its own process so its peak memory is its own;
step time is the median of the timed steps after warm-up. Needs torch, transformers, peft and this repository's src/
(no hydra/omegaconf).

    python scripts/gpu_anchor.py --out outputs/gpu_anchor          # on a GPU: the real sizes
    python scripts/gpu_anchor.py --small --out /tmp/anchor          # anywhere, tiny sizes, seconds (a CPU check)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from memory_table import PRESETS  # beside this script
from transformers import AutoModelForCausalLM, LlamaConfig

from ptv2.modeling import injection
from ptv2.modeling.prompts import PrefixEncoder, official_init_

ARMS = ("ptv2", "lora", "peft_prefix")
FULL = dict(
    shape={**PRESETS["llama-3.2-1b"][1], "max_position_embeddings": 2048},  # Llama-3.2-1B's shape
    batch=8,
    length=512,
    prefix=128,
    warmup=3,
    steps=10,
)
SMALL = dict(
    shape=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    batch=2,
    length=32,
    prefix=4,
    warmup=1,
    steps=2,
)


def build(arm: str, sizes: dict, device: str):
    """(model to call, trainable parameters, forward extras(batch) -> dict) for one arm."""
    config = LlamaConfig(**sizes["shape"], attention_dropout=0.0)
    attention = injection.ATTENTION_KEY if arm == "ptv2" else "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=torch.bfloat16)
    model.requires_grad_(False)
    if arm == "ptv2":
        injection.prepare_encoder(model.base_model)
        layers, heads, head_dim = injection.encoder_shape(config)
        prompt = PrefixEncoder(list(range(layers)), heads, head_dim, config.hidden_size, sizes["prefix"]).to(device)
        official_init_(prompt, config.initializer_range)
        return model, list(prompt.parameters()), lambda batch: {"prefix_key_values": prompt(batch)}
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    if arm == "lora":
        peft_config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        )
    else:
        peft_config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=sizes["prefix"])
    model = get_peft_model(model, peft_config)
    return model, [p for p in model.parameters() if p.requires_grad], lambda batch: {}


def run_arm(arm: str, sizes: dict, device: str) -> dict:
    cuda = device == "cuda"
    model, trainable, extras = build(arm, sizes, device)
    weights_bytes = torch.cuda.memory_allocated() if cuda else None
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, sizes["shape"]["vocab_size"], (sizes["batch"], sizes["length"]), generator=generator)
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(sizes["warmup"] + sizes["steps"]):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = model(input_ids=input_ids, attention_mask=mask, labels=input_ids, **extras(sizes["batch"]))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= sizes["warmup"]:
            times.append(time.perf_counter() - started)
    return {
        "arm": arm,
        "trainable_params": sum(p.numel() for p in trainable),
        "step_seconds_median": statistics.median(times),
        "step_seconds_min": min(times),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "weights_memory_gib": weights_bytes / 2**30 if cuda else None,
        "loss": float(out.loss),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (a CPU check of the script)")
    parser.add_argument("--arm", choices=ARMS, help="run one arm in this process (the driver runs each in its own)")
    parser.add_argument("--out", default="outputs/gpu_anchor", help="folder for anchor.json and anchor.md")
    args = parser.parse_args()
    sizes = SMALL if args.small else FULL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.arm:
        try:
            result = run_arm(args.arm, sizes, device)
        except Exception as error:  # an arm that fails (e.g. PEFT prefix tuning on this transformers) is reported
            traceback.print_exc()
            result = {"arm": args.arm, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        print("RESULT " + json.dumps(result))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    import peft
    import transformers

    header = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, {name}"
    print(header, flush=True)
    results = []
    for arm in ARMS:
        command = [sys.executable, __file__, "--arm", arm] + (["--small"] if args.small else [])
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        result = json.loads(lines[-1][7:]) if lines else {"arm": arm, "error": done.stderr.strip()[-300:]}
        if "error" in result:
            print(done.stderr[-2000:], file=sys.stderr)
        results.append(result)
        print(json.dumps(result), flush=True)
    shape = sizes["shape"]
    table = [
        header,
        "",
        f"Llama shape: hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, vocab {shape['vocab_size']}; "
        f"bf16 weights, batch {sizes['batch']} x {sizes['length']}, prefix {sizes['prefix']}, "
        f"median of {sizes['steps']} steps after {sizes['warmup']}",
        "",
        "| arm | trainable params | step (s) | peak memory (GiB) |",
        "|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            table.append(f"| {r['arm']} | - | failed: {r['error']} | - |")
        else:
            peak = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a (CPU)"
            table.append(f"| {r['arm']} | {r['trainable_params']:,} | {r['step_seconds_median']:.3f} | {peak} |")
    (out / "anchor.json").write_text(json.dumps({"environment": header, "sizes": sizes, "results": results}, indent=2))
    (out / "anchor.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())

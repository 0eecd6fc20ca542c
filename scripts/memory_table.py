"""Trainable parameters and training memory of the decoder presets, computed on the meta device (nothing allocated):
ptv2 (prefix 128 on every layer) against full fine-tuning and LoRA r=8 (q/k/v/o), batch 8 x 512.

    python scripts/memory_table.py                 # the transcribed shapes below (offline)
    python scripts/memory_table.py --from-hub      # each preset's config.json from the hub instead

Memory = weights + optimiser side + activations, in GiB:
- ptv2, LoRA: frozen bf16 weights (2 bytes/parameter) + fp32 trainable parameters, gradients and AdamW moments
  (16 bytes per trainable parameter);
- full fine-tuning: fp32 master weights, gradients and AdamW moments (16 bytes/parameter), bf16 activations;
- activations: the bytes autograd saves for the backward pass in one forward of the backbone (no LM head) on the
  meta device with bf16 weights, counted by `saved_tensors_hooks` (each tensor once; parameters excluded). SDPA on
  the meta device saves what the fused kernels save (no L x L probabilities). The LM head of a generation task adds
  its logits on top (ptv2's generation head computes them for answer tokens only).
Not counted: the CUDA context, allocator fragmentation, temporary buffers of the backward pass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModel

from ptv2.modeling import injection

BATCH, LENGTH, PREFIX, RANK = 8, 512, 128, 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
GIB = 2**30
CONF = Path(__file__).resolve().parents[1] / "conf"

# Model type and shape of each decoder preset (conf/backbone/<name>.yaml gives its hub id), transcribed from the
# model's published config.json (the hub is unreachable where this table was made); the parameter totals printed
# next to them are the check (they match the model cards' sizes).
PRESETS = {
    "qwen2.5-0.5b": (
        "qwen2",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
        ),
    ),  # fmt: skip
    "qwen3-0.6b": (
        "qwen3",
        dict(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=True,
        ),
    ),  # fmt: skip
    "llama-3.2-1b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=True,
        ),
    ),  # fmt: skip
    "gemma-2b": (
        "gemma",
        dict(
            hidden_size=2048,
            intermediate_size=16384,
            num_hidden_layers=18,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
            vocab_size=256000,
        ),
    ),  # fmt: skip
    "mistral-7b": (
        "mistral",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32768,
            tie_word_embeddings=False,
        ),
    ),  # fmt: skip
    "llama-3.1-8b": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=False,
        ),
    ),  # fmt: skip
    "glm-4-9b": (
        "glm",
        dict(
            hidden_size=4096,
            intermediate_size=13696,
            num_hidden_layers=40,
            num_attention_heads=32,
            num_key_value_heads=2,
            head_dim=128,
            vocab_size=151552,
            attention_bias=True,
            partial_rotary_factor=0.5,
            tie_word_embeddings=False,
        ),
    ),  # fmt: skip
}


def hub_id_of(preset: str) -> str:
    """The hub id a backbone preset loads (conf/backbone/<preset>.yaml)."""
    return yaml.safe_load((CONF / "backbone" / f"{preset}.yaml").read_text())["name_or_path"]


def saved_bytes(model, inputs: dict, parameters: set[int]) -> int:
    """Bytes autograd keeps for the backward of one forward (each base tensor once, parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in parameters:
            seen[id(base)] = base.numel() * base.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    return sum(seen.values())


def build(config, method: str):
    attention = injection.ATTENTION_KEY if method == "ptv2" else "sdpa"
    with torch.device("meta"):
        model = AutoModel.from_config(config, attn_implementation=attention, dtype=torch.bfloat16)
    model.requires_grad_(method == "full")
    if method == "ptv2":
        injection.prepare_encoder(model)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=16, target_modules=LORA_TARGETS))
    return model


def measure(config) -> dict[str, dict[str, float]]:
    ids = torch.zeros(BATCH, LENGTH, dtype=torch.long, device="meta")
    # The backbone is measured without its LM head; an untied one (generation) adds vocabulary x hidden weights.
    lm_head = 0 if getattr(config, "tie_word_embeddings", True) else config.vocab_size * config.hidden_size
    rows = {}
    for method in ("ptv2", "lora", "full"):
        model = build(config, method)
        total = lm_head + sum(p.numel() for p in model.parameters() if not p.requires_grad or method == "full")
        inputs = {"input_ids": ids}
        if method == "ptv2":
            layers, heads, head_dim = injection.encoder_shape(config)
            # PrefixEncoder's parameter and batch expansion (its autocast check has no meta device)
            weight = torch.zeros(PREFIX, layers * 2 * heads * head_dim, device="meta", requires_grad=True)
            parts = weight.expand(BATCH, -1, -1).view(BATCH, PREFIX, layers * 2, heads, head_dim)
            parts = parts.permute(2, 0, 3, 1, 4).unbind(0)
            inputs["prefix_key_values"] = {i: (parts[2 * i], parts[2 * i + 1]) for i in range(layers)}
            trainable = weight.numel()
        else:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        activations = saved_bytes(model, inputs, {id(p) for p in model.parameters()})
        weights = 16 * total if method == "full" else 2 * total + 16 * trainable
        rows[method] = dict(total=total, trainable=trainable, weights=weights, activations=activations)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-hub", action="store_true", help="read each preset's config.json from the hub")
    parser.add_argument("presets", nargs="*", help="a subset of: " + ", ".join(PRESETS))
    args = parser.parse_args()
    print(f"batch {BATCH} x {LENGTH}; ptv2 prefix {PREFIX} on every layer; LoRA r={RANK} on q/k/v/o; memory in GiB")
    print("| backbone | params | ptv2 trainable | ptv2 memory | LoRA trainable | LoRA memory | full FT memory |")
    print("|---|---|---|---|---|---|---|")
    for name in args.presets or PRESETS:
        model_type, shape = PRESETS[name]
        hub_id = hub_id_of(name)
        config = AutoConfig.from_pretrained(hub_id) if args.from_hub else AutoConfig.for_model(model_type, **shape)
        rows = measure(config)
        ptv2, lora, full = rows["ptv2"], rows["lora"], rows["full"]

        def memory(row):
            return f"{(row['weights'] + row['activations']) / GIB:.1f}"

        def share(row, total=full["total"]):
            return f"{row['trainable'] / 1e6:.2f} M ({100 * row['trainable'] / total:.2f} %)"

        print(
            f"| {name} ({hub_id}) | {full['total'] / 1e9:.2f} B | {share(ptv2)} | {memory(ptv2)} | {share(lora)} | "
            f"{memory(lora)} | {memory(full)} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

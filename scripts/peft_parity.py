"""python scripts/peft_parity.py RUN --data DIR/RTE [--backbone DIR]

How far stock PEFT is from `ptv2 predict` for an exported RTE run: `ptv2 export` into a temporary folder, `ptv2
predict` on DIR/val.jsonl, then the adapter loaded with PeftModel.from_pretrained and run two ways: PEFT's own
forward, and the exact call of docs/lora.md (the base model with PEFT's prefix as its cache, the mask with P ones
in front, segment ids kept, position ids from 0 when the prompt was trained so). Prints the largest probability
difference and the number of labels that differ for each. A LoRA run has no exact call: PEFT's forward is it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

PTV2 = [sys.executable, "-m", "ptv2.cli"]


def ptv2(*args: str) -> None:
    subprocess.run([*PTV2, *args], check=True, capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the RTE folder (val.jsonl)")
    parser.add_argument("--backbone", help="the backbone folder (default: the run's, as ptv2 resolves it)")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        adapter, predictions = Path(scratch) / "adapter", Path(scratch) / "predict"
        backbone = (
            args.backbone
            or json.loads(safe_open(str(args.run / "prompt.safetensors"), framework="pt").metadata()["config"])[
                "backbone"
            ]["name_or_path"]
        )
        ptv2("export", str(args.run), "--to", "peft", str(adapter), "--backbone", backbone)
        ptv2("predict", f"ckpt={args.run}", f"input={args.data / 'val.jsonl'}", f"output_dir={predictions}",
             f"backbone.name_or_path={backbone}", f"hydra.run.dir={predictions / 'run'}")  # fmt: skip
        lines = [json.loads(line) for line in (predictions / "rte-scores.jsonl").read_text().splitlines()]
        expected = torch.tensor([list(line["scores"].values()) for line in lines], dtype=torch.float64)
        with safe_open(str(adapter / "ptv2_heads.safetensors"), framework="pt") as handle:
            info = handle.metadata()
        heads = load_file(str(adapter / "ptv2_heads.safetensors"))
        settings = json.loads((adapter / "adapter_config.json").read_text())
        model = PeftModel.from_pretrained(AutoModel.from_pretrained(backbone), str(adapter)).eval()

    records = [json.loads(line) for line in (args.data / "val.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    max_length = json.loads(safe_open(str(args.run / "prompt.safetensors"), framework="pt").metadata()["config"])
    max_length = max_length["task"]["max_length"]
    ways = {"PeftModel forward": [], "exact call": []}
    for first in range(0, len(records), 32):
        chunk = records[first : first + 32]
        batch = tokenizer([r["premise"] for r in chunk], [r["hypothesis"] for r in chunk], truncation=True,
                          max_length=max_length, padding=True, return_tensors="pt")  # fmt: skip
        rows, length = batch["input_ids"].shape
        mask = batch["attention_mask"]
        with torch.no_grad():
            # What a PEFT user calls: every input; PEFT drops token_type_ids for a prefix (with a warning).
            ways["PeftModel forward"].append(model(**batch).last_hidden_state)
            if settings["peft_type"] == "PREFIX_TUNING":
                prefix = settings["num_virtual_tokens"]
                from_zero = info["positions"] == "from 0"
                extra = {"position_ids": torch.arange(length).expand(rows, length)} if from_zero else {}
                ways["exact call"].append(
                    model.get_base_model()(
                        input_ids=batch["input_ids"],
                        attention_mask=torch.cat([mask.new_ones(rows, prefix), mask], 1),
                        token_type_ids=batch["token_type_ids"],
                        cache=model.get_prompt(batch_size=rows),
                        **extra,
                    ).last_hidden_state
                )
    name = json.loads(info["labels"])
    task = next(iter(name))
    for way, hidden in ways.items():
        if not hidden:
            continue
        logits = torch.cat([h[:, 0] for h in hidden]) @ heads[f"heads.{task}.linear.weight"].T
        probabilities = (logits + heads[f"heads.{task}.linear.bias"]).double().softmax(-1)
        difference = (probabilities - expected).abs().max().item()
        flipped = int((probabilities.argmax(-1) != expected.argmax(-1)).sum())
        print(f"{way}: max |p - ptv2 predict| = {difference:.2e}, labels that differ: {flipped} of {len(records)}")
    print(f"adapter: {settings['peft_type']}; positions {info['positions']}, token_type_ids {info['token_type_ids']}")
    print(f"wall: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

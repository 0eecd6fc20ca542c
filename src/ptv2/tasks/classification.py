"""Sentence(-pair) classification with a linear head on [CLS]: examples have text_a, text_b ("" if none), label.

With `task.head=verbalizer` every sequence also gets a mask slot, "? <mask>", before its closing separator
("[CLS] a [SEP] b ? [MASK] [SEP]"), where the verbalizer head reads its label words. A decoder's tokenizer has no
mask token: its slot is "?" at the end, where the LM head's next-token logits score the label words.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ptv2.data import Split, reader_hook
from ptv2.io import write_jsonl
from ptv2.modeling.heads import ClassificationHead

HEAD = ClassificationHead
HEAD_KINDS = ("linear", "pooler", "verbalizer")
VERBALIZER_WORDS = None  # one label word per label


def feature_length(input_ids: list[int]) -> int:
    return len(input_ids)


def encode(batch: dict[str, list], tokenizer, task) -> dict[str, list]:
    pairs = any(batch["text_b"])
    slot = mask_slot(tokenizer) if task.get("head") == "verbalizer" else []
    features = tokenizer(
        batch["text_a"], batch["text_b"] if pairs else None, truncation=True, max_length=task.max_length - len(slot)
    )
    if slot:
        insert_mask_slot(features, slot, ends_with_separator(tokenizer))
    features["labels"] = batch["label"]
    return features


def mask_slot(tokenizer) -> list[int]:
    """Token ids of "? <mask>": the question mark makes the label word a natural answer for the MLM head (without a
    mask token, "?" alone: the label word is the next token)."""
    mask = [tokenizer.mask_token_id] if tokenizer.mask_token_id is not None else []
    return tokenizer(" ?", add_special_tokens=False)["input_ids"] + mask


def ends_with_separator(tokenizer) -> bool:
    """Whether the tokenizer closes a sequence with a special token (encoders' [SEP] / </s>; decoders: no)."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[-1] in tokenizer.all_special_ids


def insert_mask_slot(features, slot: list[int], before_last: bool = True) -> None:
    """Insert `slot` before the closing separator (`before_last`; else at the end) of every tokenized sequence (in
    place) and record where its mask is in "mask_position". The slot takes the segment (token type) of the last text."""
    rows = len(features["input_ids"])
    features["mask_position"] = [0] * rows
    for row in range(rows):
        # Before the closing separator (encoders); at the very end where there is none (decoders).
        at = len(features["input_ids"][row]) - before_last
        fillers = {"input_ids": slot, "attention_mask": [1] * len(slot)}
        if "token_type_ids" in features:
            fillers["token_type_ids"] = [features["token_type_ids"][row][at - 1]] * len(slot)
        for key, filler in fillers.items():
            values = features[key][row]
            features[key][row] = values[:at] + filler + values[at:]
        features["mask_position"][row] = at + len(slot) - 1


def pad(features: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """Pad token features (B, L); with mask slots also "mask_positions" (B,), moved along by left padding."""
    batch = tokenizer.pad(
        [{k: v for k, v in f.items() if k not in ("labels", "mask_position")} for f in features], return_tensors="pt"
    )
    if "mask_position" in features[0]:
        width = batch["input_ids"].shape[1]
        left = tokenizer.padding_side == "left"
        batch["mask_positions"] = torch.tensor(
            [f["mask_position"] + (width - len(f["input_ids"]) if left else 0) for f in features]
        )
    return dict(batch)


def collate(features: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    labels = torch.tensor([f["labels"] for f in features])
    return {**pad(features, tokenizer), "labels": labels}


def outputs(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    return logits.float()


def metrics(task, split: Split, outputs: list[np.ndarray]) -> dict[str, float]:
    """Accuracy, or the metrics the task's reader declares (`metrics(task, split, scores)`, e.g. SuperGLUE's)."""
    scores = np.stack(outputs)  # (examples, labels)
    if own := reader_hook(task, "metrics"):
        return own(task, split, scores)
    labels = np.array([example["label"] for example in split.examples])
    return {"accuracy": float((scores.argmax(-1) == labels).mean())}


def write_predictions(task, split: Split, outputs: list[np.ndarray], out_dir) -> list[Path]:
    """Prediction file(s) of one split: the reader's own files when it declares `write_predictions` (SuperGLUE: the
    leaderboard file, e.g. RTE.jsonl), otherwise <task>-<split>.jsonl with one {"idx", "label": label name} line per
    example."""
    scores = np.stack(outputs)  # (examples, labels)
    out_dir = Path(out_dir)
    if own := reader_hook(task, "write_predictions"):
        return own(task, split, scores, out_dir)
    labels = list(task.labels)
    lines = [
        {"idx": example.get("idx", i), "label": labels[int(predicted)]}
        for i, (example, predicted) in enumerate(zip(split.examples, scores.argmax(-1), strict=True))
    ]
    return [write_jsonl(out_dir / f"{task.name}-{split.name}.jsonl", lines)]

"""Multiple choice (COPA): examples have text_a, choices [str, ...], label (the right choice's index, -1 if none).

Each (text_a, choice) pair is one sequence; a feature holds one token list per choice. Batches are flattened to
(B*C, L) with batch["num_choices"] = C, the head scores every sequence and regroups the scores to (B, C), and the
loss is a softmax over the choices. With `task.head=verbalizer` each sequence gets the mask slot of
classification.py and one label word's MLM logit is its score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ptv2.data import Split, reader_hook
from ptv2.errors import UserError
from ptv2.io import write_jsonl
from ptv2.modeling.heads import MultipleChoiceHead
from ptv2.tasks import classification
from ptv2.tasks.classification import ends_with_separator, insert_mask_slot, mask_slot, pad

HEAD = MultipleChoiceHead
HEAD_KINDS = ("linear", "pooler", "verbalizer")
VERBALIZER_WORDS = 1  # one label word, whose MLM logit scores each choice
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mask_position")

# Scores are one row per example here too ((B, C) choice scores instead of (B, labels)), so outputs and metrics
# are classification's.
outputs, metrics = classification.outputs, classification.metrics


def feature_length(input_ids: list[list[int]]) -> int:
    """A feature holds one token list per choice: its longest one."""
    return max(map(len, input_ids))


def encode(batch: dict[str, list], tokenizer, task) -> dict[str, list]:
    """Tokenize every (text_a, choice) pair; feature values are lists with one entry per choice."""
    counts = [len(choices) for choices in batch["choices"]]
    firsts = [text for text, count in zip(batch["text_a"], counts, strict=True) for _ in range(count)]
    seconds = [choice for choices in batch["choices"] for choice in choices]
    slot = mask_slot(tokenizer) if task.get("head") == "verbalizer" else []
    flat = tokenizer(firsts, seconds, truncation=True, max_length=task.max_length - len(slot))
    if slot:
        insert_mask_slot(flat, slot, ends_with_separator(tokenizer))
    features = {key: [] for key in TOKEN_KEYS if key in flat}
    start = 0
    for count in counts:
        for key in features:
            features[key].append(flat[key][start : start + count])
        start += count
    features["labels"] = batch["label"]
    return features


def collate(features: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """(B*C, L) token tensors, example-major (the C choices of example 0 first), plus num_choices and labels (B,)."""
    num_choices = len(features[0]["input_ids"])
    if any(len(f["input_ids"]) != num_choices for f in features):
        raise UserError("every example of a multiple-choice task needs the same number of choices")
    keys = [key for key in TOKEN_KEYS if key in features[0]]
    sequences = [{key: f[key][c] for key in keys} for f in features for c in range(num_choices)]
    labels = torch.tensor([f["labels"] for f in features])
    return {**pad(sequences, tokenizer), "labels": labels, "num_choices": num_choices}


def write_predictions(task, split: Split, outputs: list[np.ndarray], out_dir) -> list[Path]:
    """Prediction file(s) of one split: the reader's own files when it declares `write_predictions` (SuperGLUE COPA:
    COPA.jsonl, {"idx", "label": choice 0|1}), otherwise <task>-<split>.jsonl with one {"idx", "label": the chosen
    index} line per example."""
    scores = np.stack(outputs)  # (examples, choices)
    out_dir = Path(out_dir)
    if own := reader_hook(task, "write_predictions"):
        return own(task, split, scores, out_dir)
    lines = [
        {"idx": example.get("idx", i), "label": int(choice)}
        for i, (example, choice) in enumerate(zip(split.examples, scores.argmax(-1), strict=True))
    ]
    return [write_jsonl(out_dir / f"{task.name}-{split.name}.jsonl", lines)]

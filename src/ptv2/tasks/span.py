"""Extractive QA (SQuAD 1.1 / 2.0): start/end logits per token, answers from post-processed windows.

Examples come from the `squad` reader (see ptv2.data.squad for the canonical form). A question whose context is
longer than `task.max_length` becomes several overlapping windows ("features"), so a split has at least as many
features as examples.

One encoding for every split: train.py prepares training and evaluation splits with the same `encode`, so every
feature carries both the training targets (`start_positions` / `end_positions`, the CLS token when the window
lacks the whole first gold answer or the question has none) and what post-processing needs (`example_id`,
`offset_mapping`). `collate` passes only the tensors the model and its loss use; `metrics` and
`write_predictions` read the ids and offsets from the split's features. The cost: every split is tokenized twice
(once by each reader function, then checked to match) and training features carry offsets that collate drops.

Training targets are the same for SQuAD 1.1 and 2.0: a window that does not hold the answer points at CLS, which
is the v2 rule of "no answer here". `options.version_2` only changes how answers are read back: with it the
prediction is "" when the null score beats the best span, the null odds are written and scored (HasAns/NoAns,
best threshold); without it every question gets its best span (the 1.1 protocol).

Options (`task.options`): stride (128) tokens shared by neighbouring windows, n_best (20) start/end candidates per
window, max_answer_length (30) tokens, version_2 (false).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ptv2.data import Split, squad
from ptv2.errors import UserError
from ptv2.metrics.squad import squad_metrics, write_null_odds
from ptv2.metrics.squad import write_predictions as write_predictions_json
from ptv2.modeling.heads import SpanHead

HEAD = SpanHead
HEAD_KINDS = ("linear",)
VERBALIZER_WORDS = None
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULTS = {"stride": 128, "n_best": 20, "max_answer_length": 30, "version_2": False}


def feature_length(input_ids: list[int]) -> int:
    return len(input_ids)


def option(task, name: str):
    return (task.get("options") or {}).get(name, DEFAULTS[name])


def encode(batch: dict[str, list], tokenizer, task) -> dict[str, list]:
    """Windows of every question with both targets and post-processing columns (see the module docstring).

    Columns: input_ids, attention_mask (token_type_ids for BERT-style models), start_positions, end_positions,
    example_id, offset_mapping.
    """
    stride = option(task, "stride")
    check_room(batch["question"], tokenizer, task.max_length, stride)
    windows = squad.encode_eval(batch, tokenizer, task.max_length, stride)
    targets = squad.encode_train(batch, tokenizer, task.max_length, stride)
    # Both functions cut the same windows; the check keeps the two columns sets aligned if either ever changes.
    if windows["input_ids"] != targets["input_ids"]:
        raise AssertionError("training and evaluation windows differ")
    windows["start_positions"] = targets["start_positions"]
    windows["end_positions"] = targets["end_positions"]
    return windows


def check_room(questions: list[str], tokenizer, max_length: int, stride: int) -> None:
    """Refuse windows that cannot hold `stride` context tokens next to the longest question (the Rust tokenizer
    would abort the process instead of raising)."""
    if stride < 0:
        raise UserError(f"task.options.stride={stride} must be 0 or more")
    lengths = [len(ids) for ids in tokenizer([q.lstrip() for q in questions], add_special_tokens=False)["input_ids"]]
    longest = max(lengths, default=0)
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - longest
    if stride >= room:
        raise UserError(
            f"task.options.stride={stride} needs windows with more than {stride} context tokens, but "
            f"task.max_length={max_length} leaves {room} next to a question of {longest} tokens; raise "
            "task.max_length or lower task.options.stride"
        )


def collate(features: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """Padded model inputs (B, L) and the targets (B,); example ids and offsets stay in the split."""
    inputs = [{k: v for k, v in f.items() if k in MODEL_INPUTS} for f in features]
    batch = tokenizer.pad(inputs, return_tensors="pt")
    batch["start_positions"] = torch.tensor([f["start_positions"] for f in features])
    batch["end_positions"] = torch.tensor([f["end_positions"] for f in features])
    return dict(batch)


def outputs(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """(B, L, 2) start/end logits, padded to the batch width; `metrics` trims each row to its feature's length."""
    return logits.float()


def answers(task, split: Split, outputs: list[np.ndarray]) -> tuple[dict[str, str], dict[str, float]]:
    """(predictions {question id: answer text}, null odds {question id: null - best span score}; empty for 1.1)."""
    features = split.features.select_columns(["example_id", "offset_mapping"]).to_list()
    if len(outputs) != len(features):
        raise ValueError(f"{len(features)} features in split {split.name} but {len(outputs)} outputs")
    starts, ends = [], []
    for row, feature in zip(outputs, features, strict=True):
        row = np.asarray(row)[: len(feature["offset_mapping"])]  # drop the batch padding: (L_feature, 2)
        starts.append(row[:, 0])
        ends.append(row[:, 1])
    return squad.postprocess(
        split.examples,
        features,
        starts,
        ends,
        n_best=option(task, "n_best"),
        max_answer_length=option(task, "max_answer_length"),
        version_2=bool(option(task, "version_2")),
    )


def metrics(task, split: Split, outputs: list[np.ndarray]) -> dict[str, float]:
    """Official SQuAD scores in percent: exact_match and f1; for version_2 also HasAns_/NoAns_ exact and f1 and
    the best null-odds threshold (best_exact, best_exact_thresh, best_f1, best_f1_thresh)."""
    predictions, null_odds = answers(task, split, outputs)
    return squad_metrics(split.examples, predictions, null_odds or None)


def write_predictions(task, split: Split, outputs: list[np.ndarray], out_dir: str | Path) -> list[Path]:
    """The official prediction file `<task>-<split>-predictions.json` ({question id: answer text}) and, for
    version_2, the official `na_prob` file `<task>-<split>-null_odds.json` ({question id: null odds}); the
    files feed the official evaluate-v1.1.py / evaluate-v2.0.py scripts as they are."""
    predictions, null_odds = answers(task, split, outputs)
    stem = Path(out_dir) / f"{task.name}-{split.name}"
    written = [write_predictions_json(f"{stem}-predictions.json", predictions)]
    if option(task, "version_2"):
        written.append(write_null_odds(f"{stem}-null_odds.json", null_odds))
    return written

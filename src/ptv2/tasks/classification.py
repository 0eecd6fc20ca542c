"""Sentence(-pair) classification with a linear head on [CLS]: examples have text_a, text_b ("" if none), label."""

from __future__ import annotations

import numpy as np
import torch

from ptv2.data import Split


def encode(batch: dict[str, list], tokenizer, task) -> dict[str, list]:
    pairs = any(batch["text_b"])
    features = tokenizer(
        batch["text_a"], batch["text_b"] if pairs else None, truncation=True, max_length=task.max_length
    )
    features["labels"] = batch["label"]
    return features


def collate(features: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    labels = torch.tensor([f["labels"] for f in features])
    batch = tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in features], return_tensors="pt")
    return {**batch, "labels": labels}


def outputs(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    return logits.float()


def metrics(task, split: Split, outputs: list[np.ndarray]) -> dict[str, float]:
    """Accuracy, or the SuperGLUE task's official metrics when the task comes from the SuperGLUE reader."""
    scores = np.stack(outputs)  # (examples, labels)
    if task.reader == "superglue":
        from ptv2.metrics import superglue_metrics

        return superglue_metrics(task.name, split.examples, scores)
    labels = np.array([example["label"] for example in split.examples])
    return {"accuracy": float((scores.argmax(-1) == labels).mean())}

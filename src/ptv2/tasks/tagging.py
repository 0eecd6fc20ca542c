"""Sequence tagging (NER, SRL): one BIO tag per word, predicted from the word's first sub-word.

Examples come from the `tagging` reader (ptv2.data.tagging): ``{"idx", "tokens", "tags", "predicate"}``, with
``predicate`` the word index of the SRL predicate and -1 for NER. Every example is one feature (no windows).

Inputs. NER: the words alone. SRL: the words, then a second segment holding the predicate word, which is how the
official P-tuning v2 code tells the model which predicate to label (tasks/srl/dataset.py appends the words
``[SEP] <predicate>`` to the sentence). We build that second segment with the tokenizer's own pair encoding
instead of a literal "[SEP]" word. For BERT the token sequence is the same as the official one
(``[CLS] words [SEP] predicate [SEP]``) except that the predicate segment gets token type 1 (the official single
sequence had type 0 throughout); for RoBERTa the official literal "[SEP]" was cut into ordinary sub-words
("[", "SE", "P", "]"), whereas the pair encoding uses RoBERTa's real separator ``</s></s>``. Truncation only ever
cuts the sentence, never the predicate segment.

Byte-level BPE tokenizers (RoBERTa, GPT-2) must see pre-split words with a leading space, as they do inside
running text; the official code loads them with ``add_prefix_space=True`` and so do we (on a copy, see
`word_tokenizer`).

Features: input_ids, attention_mask (token_type_ids for BERT-style models), ``labels`` (the label id on the first
sub-word of every word of the sentence, -100 elsewhere, so the loss ignores the other sub-words, the special
tokens and the predicate segment) and ``word_ids`` (per token: the word whose tag it predicts, -1 elsewhere), which
maps predictions back to words. A gold tag missing from ``task.labels`` (a type absent from the training data)
gets -100: it cannot be learnt, and the metrics still count its entity as missed (they read the examples' tags).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from tokenizers import pre_tokenizers

from ptv2.data import Split
from ptv2.data.tagging import is_srl, label_set
from ptv2.io import write_jsonl
from ptv2.metrics.tagging import tagging_metrics
from ptv2.modeling.heads import IGNORE_INDEX, TokenClassificationHead

HEAD = TokenClassificationHead
HEAD_KINDS = ("linear",)
VERBALIZER_WORDS = None
PER_TOKEN = ("labels",)  # batch keys with one value per token (padded like input_ids)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
NO_WORD = -1  # word_ids entry of a token that predicts no word's tag
SRL_EXCLUDED_TYPES = ("V",)  # the predicate span is given in the input, so it is not scored (as srl-eval.pl)

_word_tokenizers: dict[int, tuple[object, object]] = {}


def feature_length(input_ids: list[int]) -> int:
    return len(input_ids)


def labels(examples: list[dict]) -> list[str]:
    """Label names from the training examples: "O" first, then the sorted BIO tags."""
    return label_set(examples)


def word_tokenizer(tokenizer):
    """The tokenizer to apply to pre-split words: a byte-level BPE one (RoBERTa) gets a copy that adds the leading
    space every word has in running text; others are returned as they are. Copies are made once per tokenizer."""
    pre_tokenizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    if not isinstance(pre_tokenizer, pre_tokenizers.ByteLevel) or pre_tokenizer.add_prefix_space:
        return tokenizer
    cached = _word_tokenizers.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        prefixed = copy.deepcopy(tokenizer)
        prefixed.backend_tokenizer.pre_tokenizer.add_prefix_space = True
        cached = _word_tokenizers[id(tokenizer)] = (tokenizer, prefixed)
    return cached[1]


def encode(batch: dict[str, list], tokenizer, task) -> dict[str, list]:
    """Tokenize pre-split words (SRL: plus the predicate segment) and align word labels with first sub-words.

    Columns: input_ids, attention_mask (token_type_ids), labels and word_ids, each of the feature's length.
    """
    tokenizer = word_tokenizer(tokenizer)
    label_ids = {name: i for i, name in enumerate(task.labels)}
    srl = is_srl(task)
    predicates = [[words[p]] for words, p in zip(batch["tokens"], batch["predicate"], strict=True)] if srl else None
    features = tokenizer(
        batch["tokens"],
        predicates,
        is_split_into_words=True,
        truncation="only_first" if srl else True,
        max_length=task.max_length,
    )
    features["labels"], features["word_ids"] = [], []
    for row, tags in enumerate(batch["tags"]):
        token_words = features.word_ids(row)
        segments = features.sequence_ids(row)
        labels_row, words_row, previous = [], [], None
        for word, segment in zip(token_words, segments, strict=True):
            first_piece = word is not None and segment == 0 and word != previous
            labels_row.append(label_ids.get(tags[word], IGNORE_INDEX) if first_piece else IGNORE_INDEX)
            words_row.append(word if first_piece else NO_WORD)
            if segment == 0:
                previous = word
        features["labels"].append(labels_row)
        features["word_ids"].append(words_row)
    return features


def collate(features: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """Padded model inputs (B, L) and labels (B, L) padded with -100 (right padding, as every supported encoder)."""
    inputs = [{k: v for k, v in f.items() if k in MODEL_INPUTS} for f in features]
    batch = dict(tokenizer.pad(inputs, return_tensors="pt"))
    labels_ = torch.full(batch["input_ids"].shape, IGNORE_INDEX, dtype=torch.long)
    for row, feature in enumerate(features):
        labels_[row, : len(feature["labels"])] = torch.tensor(feature["labels"])
    batch["labels"] = labels_
    return batch


def outputs(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """(B, L) predicted label ids (int32): argmax over the labels, so evaluation keeps no (B, L, labels) logits."""
    return logits.argmax(dim=-1).to(torch.int32)


def predicted_tags(task, split: Split, outputs: list[np.ndarray]) -> list[list[str]]:
    """Word-level predicted tags of every example. Words without a labelled sub-word in the feature (cut off by
    truncation at task.max_length, or that tokenize to nothing) are predicted "O"."""
    if len(outputs) != len(split.examples):
        raise ValueError(f"{len(split.examples)} examples in split {split.name} but {len(outputs)} outputs")
    names = np.array(list(task.labels), dtype=object)
    predicted = []
    for example, row, word_ids in zip(split.examples, outputs, split.features["word_ids"], strict=True):
        word_ids = np.asarray(word_ids)
        labelled = word_ids != NO_WORD
        tags = np.full(len(example["tokens"]), "O", dtype=object)
        tags[word_ids[labelled]] = names[np.asarray(row)[: len(word_ids)][labelled]]  # row: batch-padded (L_batch,)
        predicted.append(tags.tolist())
    return predicted


def metrics(task, split: Split, outputs: list[np.ndarray]) -> dict:
    """Span-level micro precision / recall / f1 and per-type scores (``per_type``), seqeval's rules, in [0, 1].

    Gold spans come from the examples' own word tags, so an entity whose words truncation cut off is still
    counted, as missed (predicted "O"): truncation lowers recall visibly instead of silently dropping gold
    entities. SRL scores arguments only (`f1`): the predicate span V is excluded, as srl-eval.pl does. SRL also
    reports `f1_with_v` (with its precision and recall): seqeval over all tags, V included, as the official P-tuning v2
    code scored it (one nearly free span per example); its published SRL numbers compare with this one.
    """
    gold = [example["tags"] for example in split.examples]
    predicted = predicted_tags(task, split, outputs)
    if not is_srl(task):
        return tagging_metrics(gold, predicted)
    with_v = tagging_metrics(gold, predicted)
    scores = tagging_metrics(gold, predicted, exclude_types=SRL_EXCLUDED_TYPES)
    return {**scores, **{f"{key}_with_v": with_v[key] for key in ("f1", "precision", "recall")}}


def write_predictions(task, split: Split, outputs: list[np.ndarray], out_dir: str | Path) -> list[Path]:
    """`<task>-<split>-predictions.jsonl`: one line per example, ``{"idx", "tokens", "tags"}`` with the predicted
    word-level BIO tags (SRL lines also carry ``predicate``, the word index of the predicate)."""
    srl = is_srl(task)
    lines = [
        {
            "idx": example["idx"],
            "tokens": example["tokens"],
            "tags": tags,
            **({"predicate": example["predicate"]} if srl else {}),
        }
        for example, tags in zip(split.examples, predicted_tags(task, split, outputs), strict=True)
    ]
    return [write_jsonl(Path(out_dir) / f"{task.name}-{split.name}-predictions.jsonl", lines)]

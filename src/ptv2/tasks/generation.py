"""Generation (instruction -> answer, ChatGLM's `ptuning`): a decoder continues the prompt; trained with the
language-model loss on the answer tokens only, evaluated by greedy decoding.

Examples come from the `instructions` reader: {"idx", "prompt", "response"}. A training sequence is
prompt tokens (the tokenizer's own special tokens included, truncated to task.max_length - max_target_length)
followed by the response tokens and the end token (truncated to task.options.max_target_length, default 64);
labels are -100 on the prompt, so the loss (heads.LanguageModelHead) covers the answer and its end token.
At evaluation the prompt alone is decoded greedily for up to task.options.max_new_tokens (default:
max_target_length) tokens.

Metrics, in [0, 1]: ROUGE-L F-measure (Google's `rouge-score`), corpus BLEU-4 (`sacrebleu`, divided by 100, its
tokenizer from task.options.bleu_tokenize, default "13a"; "zh" for Chinese) and exact match of the stripped texts.
rouge-score's own tokenizer keeps only ASCII letters and digits, so text is split here into words and single
CJK characters instead (ChatGLM scored Chinese per jieba word; per character is the common substitute).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ptv2.data import Split
from ptv2.errors import UserError
from ptv2.io import write_jsonl
from ptv2.modeling.heads import IGNORE_INDEX, LanguageModelHead

HEAD = LanguageModelHead  # built by engine.head_spec on the backbone's LM head (task.head=lm)
HEAD_KINDS = ("lm",)
VERBALIZER_WORDS = None
PER_TOKEN = ("labels",)  # batch keys with one value per token (padded like input_ids)
DEFAULT_TARGET_LENGTH = 64
_WORDS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W_]+", re.UNICODE)


def end_token(tokenizer) -> int:
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise UserError(f"task.type=generation needs a tokenizer with an end token; {tokenizer.name_or_path} has none")
    return end


def target_length(task) -> int:
    return int(task.options.get("max_target_length", DEFAULT_TARGET_LENGTH))


def feature_length(input_ids: list[int]) -> int:
    return len(input_ids)


def encode(batch: dict[str, list], tokenizer, task) -> dict[str, list]:
    """input_ids = prompt + response + end, labels = -100 on the prompt, prompt_length (the prompt's tokens)."""
    answer_room = target_length(task)
    if task.max_length - answer_room < 4:
        raise UserError(
            f"task.max_length={task.max_length} leaves no room for a prompt next to task.options.max_target_length="
            f"{answer_room}; raise the one or lower the other"
        )
    end = end_token(tokenizer)
    prompts = tokenizer(batch["prompt"], truncation=True, max_length=task.max_length - answer_room)["input_ids"]
    responses = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
    features = {"input_ids": [], "attention_mask": [], "labels": [], "prompt_length": []}
    for prompt, response in zip(prompts, responses, strict=True):
        answer = response[: answer_room - 1] + [end]
        features["input_ids"].append(prompt + answer)
        features["attention_mask"].append([1] * (len(prompt) + len(answer)))
        features["labels"].append([IGNORE_INDEX] * len(prompt) + answer)
        features["prompt_length"].append(len(prompt))
    return features


def collate(features: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (B, L) for training, and the prompts alone left-padded
    (prompt_input_ids / prompt_attention_mask, (B, P)) for greedy decoding."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_token(tokenizer)
    width = max(len(f["input_ids"]) for f in features)
    prompt_width = max(f["prompt_length"] for f in features)
    batch = {
        "input_ids": torch.full((len(features), width), pad),
        "attention_mask": torch.zeros(len(features), width, dtype=torch.long),
        "labels": torch.full((len(features), width), IGNORE_INDEX),
        "prompt_input_ids": torch.full((len(features), prompt_width), pad),
        "prompt_attention_mask": torch.zeros(len(features), prompt_width, dtype=torch.long),
    }
    for row, feature in enumerate(features):
        length, prompt = len(feature["input_ids"]), feature["prompt_length"]
        batch["input_ids"][row, :length] = torch.tensor(feature["input_ids"])
        batch["attention_mask"][row, :length] = 1
        batch["labels"][row, :length] = torch.tensor(feature["labels"])
        batch["prompt_input_ids"][row, prompt_width - prompt :] = torch.tensor(feature["input_ids"][:prompt])
        batch["prompt_attention_mask"][row, prompt_width - prompt :] = 1
    return batch


def generate(model, batch: dict, member, tokenizer) -> torch.Tensor:
    """Greedy answers of a batch as UTF-8 bytes, zero-padded (B, bytes): text that gathers across processes and
    needs no tokenizer to score."""
    options = member.task.options
    end = end_token(tokenizer)
    tokens = model.generate(
        batch,
        head=member.name,
        max_new_tokens=int(options.get("max_new_tokens") or target_length(member.task)),
        eos_token_ids=[end],
    )
    texts = []
    for row in tokens.tolist():
        row = row[: row.index(end)] if end in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip().encode("utf-8"))
    out = torch.zeros(len(texts), max(1, *map(len, texts)), dtype=torch.uint8)
    for row, text in enumerate(texts):
        out[row, : len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    return out.to(batch["input_ids"].device)


def outputs(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Unused at evaluation (`generate` replaces the forward there): the answer tokens' next-token logits."""
    return logits.float()


def texts(outputs: list[np.ndarray]) -> list[str]:
    return [bytes(np.asarray(row, dtype=np.uint8)).rstrip(b"\0").decode("utf-8", errors="replace") for row in outputs]


class _WordTokenizer:
    """rouge-score tokenizer: lower-cased words, each CJK character its own token."""

    def tokenize(self, text: str) -> list[str]:
        return _WORDS.findall(text.lower())


def metrics(task, split: Split, outputs: list[np.ndarray]) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions = texts(outputs)
    references = [example["response"].strip() for example in split.examples]
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for ref, pred in zip(references, predictions, strict=True)]
    bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize=task.options.get("bleu_tokenize", "13a"))
    exact = [pred == ref for pred, ref in zip(predictions, references, strict=True)]
    return {"rougeL": float(np.mean(rouge)), "bleu4": bleu.score / 100, "exact_match": float(np.mean(exact))}


def write_predictions(task, split: Split, outputs: list[np.ndarray], out_dir) -> list[Path]:
    """<task>-<split>-generations.jsonl: {"idx", "prompt", "prediction", "response"} per example."""
    rows = [
        {"idx": example["idx"], "prompt": example["prompt"], "prediction": prediction, "response": example["response"]}
        for example, prediction in zip(split.examples, texts(outputs), strict=True)
    ]
    return [write_jsonl(Path(out_dir) / f"{task.name}-{split.name}-generations.jsonl", rows)]

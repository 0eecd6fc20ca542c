"""The prompts a server holds on one frozen backbone, and one batch of requests for any mix of them.

Every method here runs on ONE worker thread (the batcher's): the tokenizer and the prompt set are never used by two
threads at once, so loading or unloading a prompt between two batches needs no lock.

A request's records become canonical examples (data.records: the form `ptv2 predict input=FILE` reads), then
features by the task type's own `encode` (what `prepare_split` maps over a file). The features of every request in a
batch whose prompt can mix (a deep prefix, or none) go through one backbone forward (PromptServer); a generation or
multiple-choice request runs on its own, as `ptv2 predict` runs it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ptv2.checks import check_name, validate
from ptv2.config import task_members
from ptv2.data import records
from ptv2.engine import Member
from ptv2.errors import UserError
from ptv2.modeling.methods import method, mixable
from ptv2.runs import checkpoint
from ptv2.serving import PromptServer, model_for
from ptv2.tasks import span, task_type

MIXED_TYPES = ("classification", "tagging", "span")  # heads that read one row each from a shared forward
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class RequestError(UserError):
    """A request the server refuses; `status` is its HTTP status (404: no such prompt, 422: a bad record)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class Prompt:
    """One served prompt: its run config, task and where it came from."""

    name: str
    path: Path  # the checkpoint file
    run_id: str  # the run folder's name and the checkpoint's content hash: which trained weights answered
    cfg: DictConfig
    task: DictConfig
    kind: object  # the task type module
    mixes: bool  # its rows may share a backbone forward with other prompts' rows

    def describe(self) -> dict:
        return {
            "name": self.name,
            "run_id": self.run_id,
            "checkpoint": str(self.path),
            "task": self.task.name,
            "task_type": self.task.type,
            "method": self.cfg.prompt.method,
            "labels": [str(label) for label in self.task.labels] if self.task.get("labels") else [],
        }


@dataclass
class Request:
    """The records of one HTTP request for one prompt, as canonical examples (one list per record); the worker
    fills `answers` (one per example) or `error`."""

    prompt: str
    examples: list[list[dict]]
    answers: list[dict] = field(default_factory=list)
    error: RequestError | None = None
    run_id: str = ""

    @property
    def rows(self) -> int:
        return sum(len(examples) for examples in self.examples)

    def flat(self) -> list[dict]:
        return [example for examples in self.examples for example in examples]

    def numbered(self) -> list[tuple[int, dict]]:
        """(record number, example) of every example, in order."""
        return [(number, example) for number, examples in enumerate(self.examples) for example in examples]


def run_id(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    folder = path.parent.name if path.name == checkpoint.FILENAME else path.stem
    return f"{folder}@{digest}"


class PromptPool:
    """Prompts by name on one PromptServer; `config_of(path)` gives a checkpoint's run config (with the command's
    overrides, as `ptv2 predict` reads it)."""

    def __init__(self, server: PromptServer, paths: dict[str, Path], config_of, max_tokens: int):
        self.server, self.config_of, self.max_tokens = server, config_of, max_tokens
        self.tokenizer = server.tokenizer
        self.device = next(server.encoder.parameters()).device
        self.backbone_hash = checkpoint.backbone_hash(server.encoder.config)
        self.prompts: dict[str, Prompt] = {}
        self.alone = len(paths) == 1 and not self._mixes(server.configs[next(iter(paths))])
        for name, path in paths.items():
            self.prompts[name] = self._prompt(name, checkpoint.resolve(path), server.configs[name])

    # ------------------------------------------------------------------------------------------------ prompt set

    def _mixes(self, cfg: DictConfig) -> bool:
        return method(cfg.prompt.method).mixes_in_batch

    def _prompt(self, name: str, path: Path, cfg: DictConfig) -> Prompt:
        members = task_members(cfg.task)
        if len(members) != 1:
            raise RequestError(
                f"{path} holds a multi-task prompt ({len(members)} heads); the server takes one task each"
            )
        task = members[0][1]
        kind = task_type(task.type)
        mixes = self._mixes(cfg) and task.type in MIXED_TYPES
        return Prompt(name, path, run_id(path), cfg, task, kind, mixes)

    def load(self, name: str, path: str) -> Prompt:
        """Add a prompt at runtime (refused, with the reason, when it cannot share this backbone)."""
        try:
            check_name("prompt name", name)
        except UserError as error:
            raise RequestError(str(error)) from None
        if name in self.prompts:
            raise RequestError(f"a prompt named {name} is already served; unload it first or choose another name", 409)
        try:
            resolved = checkpoint.resolve(path)
            metadata = checkpoint.read_metadata(resolved)
            if metadata["backbone_hash"] != self.backbone_hash:
                raise UserError(
                    f"{resolved} was trained on backbone {metadata['backbone']}, not the one this server holds; "
                    "start a server for that backbone"
                )
            cfg = self.config_of(str(resolved))
        except UserError as error:
            raise RequestError(str(error)) from None
        if self.alone or not self._mixes(cfg):
            reason = "this server serves one checkpoint alone" if self.alone else f"prompt.method={cfg.prompt.method}"
            raise RequestError(
                f"{resolved} cannot share this server's backbone ({reason}); only {' and '.join(mixable())} "
                "checkpoints share one: serve it alone with ptv2 serve ckpt=RUN"
            )
        try:
            prompt = self._prompt(name, resolved, cfg)
            validate(cfg, self.server.encoder.config)
            model = model_for(cfg, self.server.encoder, self.tokenizer, self.server.parts).to(self.device)
            checkpoint.load(resolved, model, use_folded=True)
        except UserError as error:
            raise RequestError(str(error)) from None
        self.server.add(name, model, cfg)
        self.prompts[name] = prompt
        return prompt

    def unload(self, name: str) -> Prompt:
        prompt = self.prompts.pop(self.known(name).name)
        self.server.remove(name)
        return prompt

    def known(self, name: str) -> Prompt:
        if name not in self.prompts:
            served = ", ".join(sorted(self.prompts)) or "none"
            raise RequestError(f"no prompt named {name}; served: {served} (GET /prompts lists them)", 404)
        return self.prompts[name]

    # ------------------------------------------------------------------------------------------------ requests

    def examples_of(self, name: str, sent: list) -> list[list[dict]]:
        """The canonical examples of a request's records (no tokenizer: safe on any thread)."""
        prompt = self.known(name)
        try:
            return records.examples_of(prompt.task, sent)
        except UserError as error:
            raise RequestError(str(error)) from None

    def _features(self, prompt: Prompt, examples: list[dict], number: int) -> list[dict]:
        """The features of one record's examples (task type's encode), after the token limit."""
        for example in examples:
            tokens = self._token_count(example)
            if tokens > self.max_tokens:
                raise RequestError(
                    f"record {number} has {tokens} tokens; this server takes at most {self.max_tokens} per record "
                    "(serve.max_tokens)",
                    413,
                )
        columns = {key: [example[key] for example in examples] for key in examples[0]}
        try:
            encoded = prompt.kind.encode(columns, self.tokenizer, prompt.task)
        except UserError as error:
            raise RequestError(f"record {number}: {error}") from None
        return [{key: values[row] for key, values in encoded.items()} for row in range(len(encoded["input_ids"]))]

    def _token_count(self, example: dict) -> int:
        texts = [value for key, value in example.items() if isinstance(value, str) and key not in ("id", "title")]
        words = [value for value in example.values() if isinstance(value, list)]  # tagging's tokens
        texts += [word for value in words for word in value if isinstance(word, str)]
        texts = [text for text in texts if text]
        if not texts:
            return 0
        return sum(len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def run(self, requests: list[Request]) -> None:
        """Answer a batch of requests: each gets its answers or its own error; the others are not disturbed."""
        mixed: list[tuple[Request, Prompt, int, list[dict]]] = []  # (request, prompt, example position, features)
        alone: dict[str, list[tuple[Request, Prompt, int, list[dict]]]] = {}
        for request in requests:
            try:
                prompt = self.known(request.prompt)
                units = [
                    (position, self._features(prompt, [example], number))
                    for position, (number, example) in enumerate(request.numbered())
                ]
            except RequestError as error:
                request.error = error
                continue
            request.run_id, request.answers = prompt.run_id, [None] * request.rows
            for position, features in units:
                unit = (request, prompt, position, features)
                mixed.append(unit) if prompt.mixes else alone.setdefault(prompt.name, []).append(unit)
        if mixed:
            rows = [(prompt, feature) for _, prompt, _, features in mixed for feature in features]
            outputs = self.server(self._merged_batch(rows), tasks=[prompt.name for prompt, _ in rows])
            self._answer(mixed, [row.float().cpu().numpy() for row in outputs])
        for name, units in alone.items():
            self._answer(units, self._run_alone(self.prompts[name], units))

    def _answer(self, units: list[tuple[Request, Prompt, int, list[dict]]], results: list) -> None:
        """Each unit's answer from its features' results (in the order of `units`)."""
        start = 0
        for request, prompt, position, features in units:
            own = results[start : start + len(features)]
            start += len(features)
            request.answers[position] = answer(prompt, request.flat()[position], features, own)

    def _run_alone(self, prompt: Prompt, units: list[tuple[Request, Prompt, int, list[dict]]]) -> list:
        """A prompt that does not mix: its own forward (multiple choice, an input-prompt method, fine-tuning) or
        greedy decoding (generation); one result per feature."""
        features = [feature for *_, group in units for feature in group]
        batch = prompt.kind.collate(features, self.tokenizer)
        batch = {key: value.to(self.device) if torch.is_tensor(value) else value for key, value in batch.items()}
        model_name, head = self.server.owner[prompt.name]
        if hasattr(prompt.kind, "generate"):
            member = Member(head, prompt.task, prompt.kind, {})
            outputs = prompt.kind.generate(self.server.models[model_name], batch, member, self.tokenizer)
            return prompt.kind.texts(list(outputs.cpu().numpy()))
        return list(self.server(batch, head=prompt.name).float().cpu().numpy())

    def _merged_batch(self, rows: list[tuple[Prompt, dict]]) -> dict:
        """One batch of every row's model inputs, padded on the tokenizer's side to the longest; the verbalizer's
        mask positions moved along with left padding."""
        width = max(len(feature["input_ids"]) for _, feature in rows)
        left = self.tokenizer.padding_side == "left"
        pads = {"input_ids": self.tokenizer.pad_token_id or 0, "attention_mask": 0, "token_type_ids": 0}
        keys = [key for key in TOKEN_INPUTS if all(key in feature for _, feature in rows)]
        batch = {key: torch.full((len(rows), width), pads[key], dtype=torch.long) for key in keys}
        mask_positions = torch.zeros(len(rows), dtype=torch.long)
        for row, (_, feature) in enumerate(rows):
            length = len(feature["input_ids"])
            where = slice(width - length, width) if left else slice(0, length)
            for key in keys:
                batch[key][row, where] = torch.tensor(feature[key])
            if "mask_position" in feature:
                mask_positions[row] = feature["mask_position"] + (width - length if left else 0)
        batch["mask_positions"] = mask_positions
        return {key: value.to(self.device) for key, value in batch.items()}


def probabilities(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    exp = np.exp(scores - scores.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def answer(prompt: Prompt, example: dict, features: list[dict], results: list) -> dict:
    """One example's answer: a label with every label's probability (classification, multiple choice), a tag and its
    probability per word (tagging), an answer span with its null odds (QA), a text (generation)."""
    labels = [str(label) for label in prompt.task.labels] if prompt.task.get("labels") else []
    if prompt.task.type == "generation":
        return {"text": results[0]}
    if prompt.task.type == "tagging":
        feature, logits = features[0], results[0]
        tags, shown = ["O"] * len(example["tokens"]), [None] * len(example["tokens"])
        chances = probabilities(logits)
        for token, word in enumerate(feature["word_ids"]):
            if word >= 0:
                best = int(chances[token].argmax())
                tags[word], shown[word] = labels[best], round(float(chances[token, best]), 6)
        return {"tags": tags, "probabilities": shown}
    if prompt.task.type == "span":
        starts = [logits[: len(feature["input_ids"]), 0] for feature, logits in zip(features, results, strict=True)]
        ends = [logits[: len(feature["input_ids"]), 1] for feature, logits in zip(features, results, strict=True)]
        options = {key: span.option(prompt.task, key) for key in ("n_best", "max_answer_length", "version_2")}
        found, _ = span.postprocess([example], features, starts, ends, **options)
        options["version_2"] = True  # the null odds are a score for either version
        _, odds = span.postprocess([example], features, starts, ends, **options)
        null_odds = odds[example["id"]]
        return {"answer": found[example["id"]], "null_odds": round(null_odds, 6) if math.isfinite(null_odds) else None}
    chances = probabilities(results[0])
    best = int(chances.argmax())
    names = labels if len(labels) == len(chances) else [str(i) for i in range(len(chances))]
    return {"label": names[best], "scores": {n: round(float(p), 6) for n, p in zip(names, chances, strict=True)}}

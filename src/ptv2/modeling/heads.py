"""Task heads on the encoder's last hidden states, one per task type. Each maps (B, L, hidden) to logits and knows
its loss, so the model and the training loop stay the same for every task."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100  # label of positions that do not count in the loss (padding, non-first sub-words)


class ClassificationHead(nn.Module):
    """Linear layer on the first ([CLS]) token: (B, L, H) -> (B, num_labels).

    With a `pooler` (task.head=pooler, the official models' head) the [CLS] state goes through the backbone's pooler
    (dense + tanh; PromptModel freezes it with the encoder) before dropout and the linear layer. With `last_token`
    (decoders, whose first token has seen nothing) it reads each row's last non-padding token instead, the
    transformers convention for decoder classifiers.
    """

    SENTENCE = True  # reads one token per sequence: a decoder's is its last (PromptModel passes last_token)

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        dropout: float,
        pooler: nn.Module | None = None,
        last_token: bool = False,
    ):
        super().__init__()
        self.pooler = pooler
        self.last_token = last_token
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        if self.pooler is not None:
            features = self.pooler(hidden)
        else:
            features = last_real_token(hidden, batch["attention_mask"]) if self.last_token else hidden[:, 0]
        # A bf16 backbone (backbone.dtype) feeds the fp32 head in fp32.
        return self.linear(self.dropout(features.to(self.linear.weight.dtype)))

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"])


def last_real_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H) -> (B, H): the state of each row's last non-padding token (left or right padding)."""
    columns = torch.arange(attention_mask.shape[1], device=hidden.device)
    last = (columns * attention_mask.to(columns.dtype)).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class MultipleChoiceHead(ClassificationHead):
    """One score per (context, choice) sequence on [CLS] (decoders: the last token), grouped by example:
    (B*C, L, H) -> (B, C)."""

    def __init__(
        self, hidden_size: int, num_labels: int, dropout: float, pooler: nn.Module | None = None, last_token=False
    ):
        super().__init__(hidden_size, 1, dropout, pooler, last_token)

    def forward(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        return super().forward(hidden, batch).view(-1, batch["num_choices"])


class TokenClassificationHead(ClassificationHead):
    """Linear layer on every token: (B, L, H) -> (B, L, num_labels)."""

    SENTENCE = False

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__(hidden_size, num_labels, dropout)

    def forward(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.linear(self.dropout(hidden.to(self.linear.weight.dtype)))

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)


class SpanHead(ClassificationHead):
    """Start/end logits per token: (B, L, H) -> (B, L, 2); loss is the mean of start and end cross-entropy."""

    SENTENCE = False

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__(hidden_size, 2, dropout)

    def forward(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.linear(self.dropout(hidden.to(self.linear.weight.dtype)))

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        start, end = logits.float().unbind(dim=-1)
        return (F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"])) / 2


class VerbalizerHead(nn.Module):
    """The backbone's MLM head at the mask slot, read at the label words: (B, L, H) -> (B, num_labels).

    logits[b, k] = MLM logit of label word k at position batch["mask_positions"][b] (the mask the task type
    appended to the input). No new parameters: the MLM head is the pretrained one (PromptModel decides whether it
    trains). Multiple choice (batch["num_choices"] = C): one label word scores each (context, choice) sequence,
    (B*C, L, H) -> (B, C).
    """

    def __init__(self, lm_head: nn.Module, label_word_ids: list[int]):
        super().__init__()
        self.lm_head = lm_head
        self.register_buffer("label_word_ids", torch.tensor(label_word_ids), persistent=False)

    def forward(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        positions = batch["mask_positions"]  # (B,)
        at_mask = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]  # (B, H)
        logits = self.lm_head(at_mask)[:, self.label_word_ids]  # (B, num_labels)
        if "num_choices" in batch:
            return logits.view(-1, batch["num_choices"])
        return logits

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"])


class LanguageModelHead(nn.Module):
    """The backbone's LM head on the answer tokens (task.head=lm, generation): (B, L, H) -> (N, vocabulary), the
    next-token logits of the N positions whose next token is labelled (batch["labels"] != -100). Logits of the
    prompt positions are never computed: at a 150k vocabulary they would dominate a step's memory."""

    def __init__(self, lm_head: nn.Module):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        answer = batch["labels"][:, 1:] != IGNORE_INDEX
        return self.lm_head(hidden[:, :-1][answer])

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        targets = batch["labels"][:, 1:]
        return F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX])

"""Load a backbone encoder and its tokenizer from the hub or a local folder, ready to take prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PretrainedConfig,
)

from ptv2 import hub
from ptv2.errors import UserError
from ptv2.modeling import injection


def _not_loadable(what: str, cfg, error: Exception) -> UserError:
    if Path(str(cfg.name_or_path)).expanduser().is_dir():  # a local folder: the hub has nothing to do with it
        text = str(error).strip()
        reason = text.splitlines()[0][:200] if text else type(error).__name__
        return UserError(
            f"could not load the {what} of backbone '{cfg.name_or_path}' ({reason}); pass a complete Hugging Face "
            "model folder (config.json, tokenizer files, model.safetensors) with backbone.name_or_path=DIR"
        )
    return UserError(
        f"could not load the {what} of backbone '{cfg.name_or_path}' ({hub.reason(error)}); "
        f"{hub.fixes('a local Hugging Face model folder with backbone.name_or_path=DIR')}"
    )


def _from_hub(location: str) -> bool:
    """Whether `location` names a hub repository rather than a local folder; probes the hub before its first use."""
    if Path(location).expanduser().is_dir():
        return False
    hub.prepare()
    return True


def load_config(cfg) -> PretrainedConfig:
    """The backbone's HF config with ptv2's dropout overrides applied (validated family)."""
    location = str(cfg.name_or_path)
    if location.startswith(("/", ".", "~")) and not Path(location).expanduser().is_dir():
        raise UserError(f"backbone.name_or_path={location} is not a folder; pass a local Hugging Face model folder")
    _from_hub(location)
    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision)
    except (OSError, ValueError) as error:
        raise _not_loadable("config", cfg, error) from None
    if getattr(config, "auto_map", None):
        # Remote code is never run. The paper's GLM-xlarge/xxlarge (THUDM/glm-2b, glm-10b) also name model type
        # "glm", transformers' native GLM-4: without this check they would load as the wrong architecture.
        raise UserError(
            f"backbone {cfg.name_or_path} needs its own remote code (config.json has auto_map), which ptv2 does not "
            "run; for the paper's GLM-xlarge/xxlarge use a native GLM such as backbone=glm-4-9b (see docs/backbones.md)"
        )
    injection.family_of(config)
    if cfg.dropout is not None:
        config.hidden_dropout_prob = cfg.dropout
    if cfg.attention_dropout is not None:
        config.attention_probs_dropout_prob = cfg.attention_dropout
    return config


def load_tokenizer(cfg):
    """The backbone's tokenizer (backbone.tokenizer when set: random-init shapes without their own files).

    Decoder tokenizers often have no padding token: the end token pads (padding is masked out anyway). Batches are
    padded on the right (the task types' labels assume it); generation pads its prompts on the left itself."""
    location = cfg.get("tokenizer") or cfg.name_or_path
    _from_hub(str(location))
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=None if cfg.get("tokenizer") else cfg.revision)
    except (OSError, ValueError) as error:
        raise _not_loadable("tokenizer", cfg, error) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _load_model(auto_class, cfg, config: PretrainedConfig, what: str) -> torch.nn.Module:
    """`auto_class` from the hub/folder, or from the config alone with backbone.random_init."""
    # DeBERTa-v2 only has its own eager attention; the others get the prefix-aware SDPA (or eager) function.
    attention = injection.attention_key(config, cfg.get("attention", "sdpa"))
    options = {"attn_implementation": attention, "dtype": getattr(torch, cfg.dtype)}  # a name of config.DTYPES
    if cfg.random_init:
        model = auto_class.from_config(config, **options)
    else:
        _from_hub(str(cfg.name_or_path))
        try:
            model = auto_class.from_pretrained(cfg.name_or_path, config=config, revision=cfg.revision, **options)
        except (OSError, ValueError) as error:
            raise _not_loadable(what, cfg, error) from None
    if cfg.get("gradient_checkpointing"):
        # Non-reentrant: the frozen embeddings' output needs no gradient, and the prefix still gets one (it enters
        # every layer as a forward kwarg, which the recomputation sees again).
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model


def load_encoder(cfg, config: PretrainedConfig | None = None) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(the bare encoder that accepts per-layer prefixes, its pooler or None).

    The pooler (dense + tanh on [CLS]) is taken out of the encoder: a pooler head owns it. It holds the
    checkpoint's weights where the checkpoint has them; otherwise (RoBERTa) transformers initialised it with the
    backbone's own `_init_weights`, N(0, initializer_range), as the official RoBERTa models got it.
    """
    encoder = _load_model(AutoModel, cfg, config or load_config(cfg), "weights")
    pooler = getattr(encoder, "pooler", None)
    if pooler is not None:
        encoder.pooler = None
    injection.prepare_encoder(encoder)
    return encoder, pooler


class MaskedLMHead(torch.nn.Module):
    """The backbone's pretrained MLM head: hidden states (..., H) -> vocabulary logits (..., V).

    Holds the masked-LM model's modules other than its encoder (BERT `cls`, RoBERTa `lm_head`, ELECTRA
    `generator_predictions` + `generator_lm_head`, DeBERTa-v2 `cls` or `lm_predictions`; a causal LM's `lm_head`).
    Decoder weights stay tied to the encoder's word embeddings, so they train or stay frozen with the encoder.
    """

    def __init__(self, masked_lm: torch.nn.Module):
        super().__init__()
        encoder = masked_lm.base_model
        self.parts = torch.nn.ModuleList(child for child in masked_lm.children() if child is not encoder)
        # DeBERTa-v2's non-legacy head takes the word embeddings as an argument instead of owning a decoder. A tuple
        # keeps them out of this module's parameters: the encoder owns them.
        self.takes_embeddings = masked_lm.config.model_type == "deberta-v2" and not masked_lm.config.legacy
        self.word_embeddings = (encoder.get_input_embeddings(),)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.takes_embeddings:
            return self.parts[0](hidden, self.word_embeddings[0])
        for part in self.parts:
            hidden = part(hidden)
        return hidden


def split_masked_lm(masked_lm: torch.nn.Module) -> tuple[torch.nn.Module, MaskedLMHead]:
    """(prompt-ready encoder, MLM head) of a loaded masked-LM model (loaded with attn_implementation=ATTENTION_KEY
    for the attention-interface families, as load_encoder does)."""
    encoder = masked_lm.base_model
    head = MaskedLMHead(masked_lm)
    injection.prepare_encoder(encoder)
    return encoder, head


def load_masked_lm(cfg, config: PretrainedConfig | None = None) -> tuple[torch.nn.Module, MaskedLMHead]:
    """The encoder (prompt-ready, as load_encoder) together with its pretrained MLM head, for verbalizer heads.

    A checkpoint without MLM weights (e.g. a sentence-embedding model) gets a randomly initialised head, with
    transformers' warning in the log.
    """
    config = config or load_config(cfg)
    # A decoder's LM head predicts the next token: its verbalizer reads the logits after the prompt's last token.
    auto_class = AutoModelForCausalLM if injection.family_of(config).causal else AutoModelForMaskedLM
    masked_lm = _load_model(auto_class, cfg, config, "language-model weights")
    return split_masked_lm(masked_lm)


def label_word_ids(tokenizer, words: list[str], where: str) -> list[int]:
    """Vocabulary ids of verbalizer label words, each of which must be one token of the backbone's vocabulary.

    A word is looked up as it appears after a space (RoBERTa's "Ġyes", SentencePiece's "▁yes"), which is how it
    follows the "?" before the mask slot.
    """
    ids = []
    for word in words:
        pieces = tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
        if len(pieces) != 1 or pieces[0] == tokenizer.unk_token_id:
            found = tokenizer.convert_ids_to_tokens(pieces)
            raise UserError(
                f"{where}: label word '{word}' is not one token of the backbone's vocabulary (it becomes {found}); "
                "choose single-token words"
            )
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise UserError(f"{where}: label words {list(words)} must be different tokens")
    return ids


@dataclass
class BackboneHeads:
    """Pretrained parts of the backbone that heads read: the MLM head, a decoder's LM head (task.head=verbalizer or
    lm), the pooler (task.head=pooler). None where the run needs none or the backbone has none."""

    lm_head: MaskedLMHead | None = None
    pooler: torch.nn.Module | None = None
    causal: bool = False  # a decoder: its LM head predicts the next token (no mask token needed)


def load_with_heads(cfg, config: PretrainedConfig, head_kinds: set[str]) -> tuple[torch.nn.Module, BackboneHeads]:
    """The prompt-ready encoder and the backbone parts that the run's heads (`task.head` values) need."""
    causal = injection.family_of(config).causal
    if head_kinds & {"verbalizer", "lm"}:
        if "pooler" in head_kinds:
            raise UserError("task.head=verbalizer and task.head=pooler cannot share a run; choose one for all members")
        encoder, lm_head = load_masked_lm(cfg, config)
        return encoder, BackboneHeads(lm_head=lm_head, causal=causal)
    encoder, pooler = load_encoder(cfg, config)
    return encoder, BackboneHeads(pooler=pooler if "pooler" in head_kinds else None, causal=causal)

"""The one model class: an encoder, a prompt chosen by the method, and one head per dataset."""

from __future__ import annotations

import torch
from torch import nn

from ptv2.modeling.generation import generate_greedy
from ptv2.modeling.heads import LanguageModelHead, VerbalizerHead
from ptv2.modeling.injection import (
    encoder_shape,
    family_of,
    run_encoder,
    run_encoder_from,
    shifted_position_ids,
)
from ptv2.modeling.methods import method
from ptv2.modeling.peft_methods import add_lora, add_peft_prefix
from ptv2.modeling.prompts import PrefixEncoder, official_init_, prompt_layers


def cached_start(cached: dict | None, lowest: int) -> int | None:
    """The layer to run from when a batch carries cached hidden states ({layer they enter: hidden}) and the lowest
    layer that sees a prompt is `lowest`: the highest cached layer at or below it (None: run the whole encoder)."""
    usable = [layer for layer in cached or () if layer <= lowest]
    return max(usable) if usable else None


class PromptModel(nn.Module):
    """Encoder + prompt + heads.

    forward(batch, head=name) -> logits of that head (see heads.py for shapes). `batch` holds input_ids and
    attention_mask (B, L), optionally token_type_ids (B, L), plus whatever the head needs (e.g. num_choices).
    """

    def __init__(self, encoder: nn.Module, prompt_cfg, heads: dict[str, tuple | nn.Module], head_dropout: float):
        """heads: {name: (head class, number of labels[, pooler]) or a built head (VerbalizerHead)} — one head per
        dataset, all on the same prompt. A pooler (the backbone's, task.head=pooler) is shared by the heads given it.

        New modules (prompt, heads) start as the official models' did: N(0, initializer_range) weights, zero biases;
        `prompt.init_std` overrides the std of the prompt embeddings."""
        super().__init__()
        self.encoder = encoder
        self.method = prompt_cfg.method
        chosen = method(self.method)
        self.frozen = chosen.frozen
        self.trains_backbone_heads = chosen.trains_backbone_heads
        self.shift_positions = bool(prompt_cfg.get("shift_positions")) and chosen.prompt == "prefix"
        config = encoder.config
        num_layers, num_heads, head_dim = encoder_shape(config)

        self.prompt: nn.Module | None = None
        # the lowest layer whose computation the prompt (or a trained backbone) changes; the layers below it are the
        # frozen layers a run may cache (frozen.py)
        self.lowest_layer = 0 if (chosen.prompt == "input" or chosen.peft or not chosen.frozen) else num_layers
        if chosen.build is not None:
            self.prompt = chosen.build(prompt_cfg, config)
        if chosen.prompt == "prefix":
            self.lowest_layer = min(prompt_layers(prompt_cfg.layers, num_layers))
        if hasattr(self.prompt, "attach"):  # a prompt that acts inside the backbone's layers (hooks on them)
            self.prompt.attach(encoder)
        # The method's training objective (objective(model, batch, head) -> loss), None: the head's loss
        self.objective = chosen.objective(prompt_cfg) if chosen.objective else None
        self.heads = nn.ModuleDict({name: self._build_head(spec, config, head_dropout) for name, spec in heads.items()})
        if self.prompt is not None:
            official_init_(self.prompt, config.initializer_range, embedding_std=prompt_cfg.get("init_std"))
        self.encoder.requires_grad_(not self.frozen)
        # PEFT's methods add their trained part after the freeze, so it is the only part of the encoder that trains.
        # peft_prefix makes `encoder` PEFT's wrapper (its forward passes the prefix as a cache); lora adapts in place.
        if chosen.peft == "lora":
            self.encoder = add_lora(self.encoder, prompt_cfg)
        elif chosen.peft == "prefix":
            self.encoder = add_peft_prefix(self.encoder, prompt_cfg)
        self._set_backbone_head_trainability()

    @staticmethod
    def _build_head(spec, config, dropout: float) -> nn.Module:
        if isinstance(spec, nn.Module):
            return spec
        head_class, num_labels, *pooler = spec
        # Decoders read a sentence from its last token: the only one that has seen the whole input.
        last_token = {"last_token": True} if getattr(head_class, "SENTENCE", False) and family_of(config).causal else {}
        head = head_class(config.hidden_size, num_labels, dropout, *pooler, **last_token)
        official_init_(head.linear, config.initializer_range)  # the pooler is the backbone's, left as loaded
        return head

    def _set_backbone_head_trainability(self) -> None:
        """Head parts that come from the backbone train with it. The pooler stays frozen with a frozen encoder (as
        in the official models). A verbalizer's MLM head (or a generation task's LM head) also does, except for a
        linear probe, which has no other head: there the MLM head's own layers train (never the word embeddings its
        decoder shares with the encoder, which `requires_grad_` on the encoder already decided)."""
        shared = {id(p) for p in self.encoder.parameters()}
        for head in self.heads.values():
            if isinstance(head, (VerbalizerHead, LanguageModelHead)):
                for parameter in head.lm_head.parameters():
                    if id(parameter) not in shared:
                        parameter.requires_grad_(not self.frozen or self.trains_backbone_heads)
            elif getattr(head, "pooler", None) is not None:
                head.pooler.requires_grad_(not self.frozen)

    def forward(self, batch: dict, head: str | None = None, loss: bool = False, perturb=None) -> torch.Tensor:
        """The logits of `head` on `batch`; loss=True: the training loss instead (the method's own objective while
        training, when it has one: `objective(model, batch, head)`). perturb (B, L, hidden): added to the input
        tokens' word embeddings (perturbation-based objectives)."""
        if loss:
            if self.objective is not None and self.training:
                return self.objective(self, batch, head)
            return self.head_for(head).loss(self(batch, head=head, perturb=perturb), batch)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        inputs = {"attention_mask": attention_mask}
        if batch.get("token_type_ids") is not None:
            inputs["token_type_ids"] = batch["token_type_ids"]
        prefix = None
        extends = hasattr(self.prompt, "extend_inputs")  # the prompt takes token positions (input prompts)
        if extends:
            inputs.update(self.prompt.extend_inputs(self.encoder, input_ids, inputs, perturb))
        elif perturb is not None:
            inputs["inputs_embeds"] = self.encoder.get_input_embeddings()(input_ids) + perturb
        else:
            inputs["input_ids"] = input_ids
        if isinstance(self.prompt, PrefixEncoder):
            prefix = self.prompt(input_ids.shape[0])
            if self.shift_positions:
                inputs["position_ids"] = shifted_position_ids(self.encoder.config, attention_mask, self.prompt.length)

        start = cached_start(batch.get("frozen_hidden"), self.lowest_layer)
        if start is not None:  # the layers below come from the run's frozen cache
            hidden = run_encoder_from(self.encoder, prefix, start, batch["frozen_hidden"][start], **inputs)
        else:
            hidden = run_encoder(self.encoder, prefix, **inputs)
        if extends:
            hidden = self.prompt.strip(hidden)
        return self.head_for(head)(hidden, batch)

    @torch.no_grad()
    def generate(self, batch: dict, head: str | None, max_new_tokens: int, eos_token_ids: list[int]) -> torch.Tensor:
        """Greedy answers (B, <= max_new_tokens) to the left-padded prompts batch["prompt_input_ids"] /
        ["prompt_attention_mask"], read by the LM head of `head` (task.head=lm) with this model's prefix."""
        prefix = self.prompt(1) if isinstance(self.prompt, PrefixEncoder) else None  # batch 1: expanded in attention
        lm_head = self.head_for(head).lm_head
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        return generate_greedy(self.encoder, lm_head, prefix, ids, mask, max_new_tokens, eos_token_ids)

    def head_for(self, name: str | None) -> nn.Module:
        return self.heads[name] if name is not None else next(iter(self.heads.values()))

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """What a prompt checkpoint holds: the parameters that training changes (prompt + heads; everything for full
        fine-tuning), and a pooler head's frozen pooler, which is not always in the backbone's checkpoint (RoBERTa's
        starts random)."""
        return {
            name: p.detach()
            for name, p in self.named_parameters()
            if p.requires_grad or (name.startswith("heads.") and ".pooler." in name)
        }

    def parameter_counts(self) -> dict[str, float]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable_params": trainable, "total_params": total, "trainable_percent": 100.0 * trainable / total}

"""A decoder run with a prefix on its layers: its forward inputs (positions counted from the mask) and greedy
generation with a cache (task.type=generation).

The prefix is injection.py's (`dict[layer, (key, value)]`); it joins inside attention at every step and never
enters the cache.
"""

from __future__ import annotations

import inspect

import torch


def decoder_inputs(input_ids=None, attention_mask=None, position_ids=None, token_type_ids=None, **inputs) -> dict:
    """A decoder's forward inputs: positions counted from the mask, so a left-padded row numbers its tokens as an
    unpadded one (transformers numbers columns); segment ids dropped (GPT-2 would add them as token embeddings);
    no cache outside generation."""
    if position_ids is None and attention_mask is not None:
        position_ids = mask_positions(attention_mask)
    return dict(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **inputs
    )


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each real token's position among the real tokens of its row (padding gets 0): left padding shifts nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def generate_greedy(
    decoder: torch.nn.Module,
    lm_head: torch.nn.Module,
    prefix: dict | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: list[int],
) -> torch.Tensor:
    """Greedy continuation (B, <= max_new_tokens) of left-padded prompts by a decoder with `prefix` on its layers.

    The prompt runs once into a DynamicCache (which holds token keys/values only: the prefix joins inside
    attention at every step); then one token per step. Rows that produced an end token continue with end tokens
    until every row has, or `max_new_tokens` is reached.
    """
    from transformers import DynamicCache

    # transformers renamed `past_key_values` to `cache` during 5.x; an unknown name would be swallowed by **kwargs.
    cache_name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    cache = DynamicCache(config=decoder.config)
    extra = {"prefix_key_values": prefix} if prefix else {}
    mask = attention_mask.long()
    positions = mask_positions(mask)
    tokens, step_ids = [], input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    eos = torch.tensor(eos_token_ids, device=input_ids.device)
    for _ in range(max_new_tokens):
        hidden = decoder(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_name: cache},
            **extra,
        ).last_hidden_state
        chosen = lm_head(hidden[:, -1]).argmax(-1)
        chosen = torch.where(done, eos[0], chosen)
        tokens.append(chosen)
        done |= torch.isin(chosen, eos)
        if done.all():
            break
        step_ids = chosen[:, None]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
    return torch.stack(tokens, dim=1)

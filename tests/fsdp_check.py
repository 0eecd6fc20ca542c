"""Worker of test_decoders.test_fsdp2_shards_the_frozen_backbone_and_trains_the_prompt (2 processes on gloo, each
given RANK, WORLD_SIZE and MASTER_* as torchrun gives them): FSDP2 shards every decoder layer of a frozen tiny Llama
and the PromptModel around them; the prompt's gradient equals the unsharded model's."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from test_decoders import padded_batch, prompt_cfg, tiny_decoder  # noqa: E402

from ptv2.modeling.heads import ClassificationHead  # noqa: E402
from ptv2.modeling.model import PromptModel  # noqa: E402

dist.init_process_group("gloo")
_, causal_lm = tiny_decoder("llama")
model = PromptModel(causal_lm.base_model, prompt_cfg(), {"t": (ClassificationHead, 2)}, head_dropout=0.0)
reference = copy.deepcopy(model)
input_ids, mask = padded_batch("right")
batch = {"input_ids": input_ids, "attention_mask": mask}
reference(batch).sum().backward()
for layer in model.encoder.layers:
    fully_shard(layer)
fully_shard(model)
model(batch).sum().backward()
weight = model.encoder.layers[0].self_attn.q_proj.weight
assert type(weight).__name__ == "DTensor" and weight.to_local().shape[0] < weight.shape[0], "not sharded"
gradient = model.prompt.embedding.weight.grad.full_tensor()
difference = (gradient - reference.prompt.embedding.weight.grad).abs().max().item()
assert difference <= 1e-6, difference
print(f"rank {dist.get_rank()}: prompt gradient difference {difference}")
dist.destroy_process_group()

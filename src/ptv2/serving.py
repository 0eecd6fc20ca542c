"""Serve several trained prompts on ONE frozen backbone, with a different task per example in the same batch.

    from ptv2.serving import PromptServer

    server = PromptServer.from_checkpoints(["runs/rte", "runs/boolq"])     # run dirs or prompt.safetensors files
    server.classify([("A man sleeps.", "Nobody sleeps."), ("Is water wet?", "Water is a liquid.")],
                    tasks=["rte", "boolq"])                               # -> ["not_entailment", "True"]
    logits = server(batch, tasks=["rte", "boolq", "rte"])                 # one output row per example

Every checkpoint must come from the same backbone (same config hash) and keep that backbone frozen (ptv2 or
linear_probe; input-prompt methods and fine-tuning change the token sequence or the weights, so they are served
alone). A mixed batch stacks each example's own key/value prefix per layer. Prompts of different lengths (or on
different layers) are zero-padded to the longest one and the padded prefix columns are masked out of the
attention, so they get exactly zero weight: each row's result equals running its own prompt alone, up to
floating-point summation order. Each row then goes through its own task's head.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig
from torch import nn

from ptv2.checks import validate
from ptv2.config import task_members
from ptv2.errors import UserError
from ptv2.modeling.heads import ClassificationHead
from ptv2.modeling.injection import family_of, position_ids, run_encoder
from ptv2.modeling.methods import method, mixable
from ptv2.modeling.model import PromptModel
from ptv2.modeling.packing import mixed_gate
from ptv2.modeling.prompts import PrefixEncoder
from ptv2.runs import checkpoint


def checkpoint_configs(paths) -> list[DictConfig]:
    """The run configs stored in checkpoints (run dirs or files)."""
    configs = [checkpoint.stored_config(path) for path in paths]  # data only: no paths, nothing resolved
    for path, cfg in zip(paths, configs, strict=True):
        checkpoint.require_backbone(cfg, path)
    return configs


def load_backbone(cfg: DictConfig):
    """(encoder, tokenizer, backbone head parts) of a run config; the encoder's random init (tiny test backbones)
    is reproduced by seeding as training did."""
    from ptv2 import engine

    backbone_config, tokenizer = engine.load_backbone(cfg)
    set_seed(cfg.trainer.seed)
    encoder, parts = engine.load_encoder(cfg, backbone_config)
    return encoder, tokenizer, parts


def model_for(cfg: DictConfig, encoder: nn.Module, tokenizer, parts) -> PromptModel:
    """A PromptModel for a checkpoint's config on an already-loaded encoder (its heads as training built them)."""
    from ptv2.engine import Member, prompt_model
    from ptv2.tasks import task_type

    members = [Member(name, task, task_type(task.type), {}) for name, task in task_members(cfg.task)]
    return prompt_model(cfg, members, encoder, tokenizer, parts)


class PromptServer(nn.Module):
    """One encoder, several prompt models sharing it; `tasks` names one served head per example.

    forward(batch, tasks=None, head=None): batch holds input_ids and attention_mask (B, L), optionally
    token_type_ids (B, L) and whatever the heads read. With `tasks` (B names) it returns a list of B output rows
    (row i: head tasks[i] applied to example i, e.g. (num_labels,) for classification, (L, num_labels) for
    tagging); with `head` (one name for the whole batch) it returns that head's output tensor, computed exactly as
    the trained model computes it.
    """

    def __init__(
        self, encoder: nn.Module, tokenizer, models: dict[str, PromptModel], configs: dict[str, DictConfig], parts=None
    ):
        """models: {name: PromptModel on `encoder`} (one per checkpoint); configs: their run configs by the same
        names; parts: the backbone's head parts (what model_for builds further models with). A model with one head
        serves it under the model's name; one with several (multi-task) serves "<name>/<head>" for each."""
        super().__init__()
        self.encoder, self.tokenizer, self.configs, self.parts = encoder, tokenizer, dict(configs), parts
        self.models = nn.ModuleDict()
        self.owner: dict[str, tuple[str, str]] = {}  # served name -> (model name, head name)
        for model_name, model in models.items():
            self.add(model_name, model, configs.get(model_name))
        self.eval()

    def add(self, model_name: str, model: PromptModel, cfg: DictConfig | None) -> None:
        """Serve one more prompt model (built on this server's encoder) under `model_name`."""
        self.models[model_name] = model.eval()
        if cfg is not None:
            self.configs[model_name] = cfg
        for head in model.heads:
            self.owner[model_name if len(model.heads) == 1 else f"{model_name}/{head}"] = (model_name, head)

    def remove(self, model_name: str) -> None:
        """Stop serving a prompt model: its prefix and heads are freed, the shared encoder stays."""
        del self.models[model_name]
        self.configs.pop(model_name, None)
        self.owner = {name: owner for name, owner in self.owner.items() if owner[0] != model_name}

    @classmethod
    def from_checkpoints(cls, paths, configs: list[DictConfig] | None = None, use_folded: bool = True):
        """Load one backbone and every checkpoint's prompt + heads onto it.

        paths: run dirs or prompt.safetensors files (a dict {name: path} names them; else the task names).
        configs: the run configs to build from (default: the ones stored in the checkpoints).
        """
        names = list(paths) if isinstance(paths, dict) else None
        paths = list(paths.values()) if isinstance(paths, dict) else list(paths)
        if not paths:
            raise UserError("no checkpoint to serve: pass ckpt=RUN_DIR or ckpt=[RUN_DIR,RUN_DIR,...]")
        configs = configs or checkpoint_configs(paths)
        hashes = {str(p): checkpoint.read_metadata(p)["backbone_hash"] for p in paths}
        if len(set(hashes.values())) > 1:
            listing = ", ".join(f"{p} ({checkpoint.read_metadata(p)['backbone']})" for p in hashes)
            raise UserError(f"checkpoints from different backbones cannot share one: {listing}")
        if len(paths) > 1:
            for path, cfg in zip(paths, configs, strict=True):
                if not method(cfg.prompt.method).mixes_in_batch:
                    raise UserError(
                        f"{path} uses prompt.method={cfg.prompt.method}, which changes the backbone or its input; "
                        f"only {' and '.join(mixable())} checkpoints share a backbone (serve it alone)"
                    )
        encoder, tokenizer, parts = load_backbone(configs[0])
        models, served = {}, {}
        for index, (path, cfg) in enumerate(zip(paths, configs, strict=True)):
            validate(cfg, encoder.config)
            model = model_for(cfg, encoder, tokenizer, parts)
            checkpoint.load(path, model, use_folded=use_folded)
            name = names[index] if names else cfg.task.name
            if name in models:
                name = f"{name}-{index}"
            models[name], served[name] = model, cfg
        return cls(encoder, tokenizer, models, served, parts)

    def head_names(self) -> list[str]:
        return list(self.owner)

    def forward(self, batch: dict, tasks: list[str] | None = None, head: str | None = None):
        if tasks is None:
            name = head or self.head_names()[0]
            return self._model_of(name)(batch, head=self.owner[name][1])
        if len(tasks) != batch["input_ids"].shape[0]:
            raise UserError(f"{len(tasks)} task names for a batch of {batch['input_ids'].shape[0]} examples")
        groups = self._groups(tasks)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if batch.get("token_type_ids") is not None:
            inputs["token_type_ids"] = batch["token_type_ids"]
        positions = self._position_ids(groups, batch["attention_mask"])
        if positions is not None:
            inputs["position_ids"] = positions
        hidden = run_encoder(self.encoder, self._mixed_prefix(groups, len(tasks)), **inputs)
        rows_out: list[torch.Tensor | None] = [None] * len(tasks)
        plain: dict[int, list[tuple[nn.Module, list[int]]]] = {}  # label count -> plain linear heads and their rows
        for name, rows in groups.items():
            head_module = self._model_of(name).head_for(self.owner[name][1])
            if self._plain_linear(head_module):
                plain.setdefault(head_module.linear.out_features, []).append((head_module, rows))
                continue
            index = torch.tensor(rows, device=hidden.device)
            sub_batch = {
                k: v[index] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == len(tasks) else v
                for k, v in batch.items()
            }
            out = head_module(hidden[index], sub_batch)
            for position, row in enumerate(rows):
                rows_out[row] = out[position]
        for heads in plain.values():
            self._linear_heads(hidden, heads, rows_out)
        return rows_out

    def _plain_linear(self, head: nn.Module) -> bool:
        """A classification head that is one linear layer on the first token (in eval mode its dropout is none)."""
        return not self.training and type(head) is ClassificationHead and head.pooler is None and not head.last_token

    @staticmethod
    def _linear_heads(hidden: torch.Tensor, heads: list[tuple[nn.Module, list[int]]], rows_out: list) -> None:
        """Plain linear heads of one label count applied to their rows at once: each row by its own head's weights
        (one batched product instead of a call per head)."""
        rows = [row for _, head_rows in heads for row in head_rows]
        owner = torch.tensor([number for number, (_, head_rows) in enumerate(heads) for _ in head_rows])
        weight = torch.stack([head.linear.weight for head, _ in heads])  # (heads, labels, hidden)
        bias = torch.stack([head.linear.bias for head, _ in heads])
        owner = owner.to(weight.device)
        features = hidden[torch.tensor(rows, device=hidden.device), 0].to(weight.dtype)
        out = torch.einsum("rh,rlh->rl", features, weight[owner]) + bias[owner]
        for position, row in enumerate(rows):
            rows_out[row] = out[position]

    def generate(self, batch: dict, head: str, **options) -> torch.Tensor:
        """Greedy answers of the served generation task `head` (see PromptModel.generate)."""
        return self._model_of(head).generate(batch, head=self.owner[head][1], **options)

    def _model_of(self, head: str) -> PromptModel:
        if head not in self.owner:
            raise UserError(f"no served task named {head}; served: {', '.join(self.owner)}")
        return self.models[self.owner[head][0]]

    def _groups(self, tasks: list[str]) -> dict[str, list[int]]:
        """{head name: row indices} in order of first appearance."""
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(tasks):
            self._model_of(name)  # fails early on an unknown name
            groups.setdefault(name, []).append(row)
        return groups

    def _mixed_prefix(self, groups: dict[str, list[int]], batch_size: int):
        """{layer: (key, value, visible[, gate])}: key/value (B, heads, P_max, head_dim) holding each row's own
        prefix, zero-padded; visible (B, P_max) is True on a row's real prefix columns only; a gate when some served
        prefix is gated (APT), each row weighted by its own prompt's gate. None without prompts."""
        prompts = {}
        for name in groups:
            prompt = self._model_of(name).prompt
            if isinstance(prompt, PrefixEncoder):
                prompts[name] = prompt(1)  # eval mode: no dropout; {layer: (key, value)} each (1, H, P, D)
        if not prompts:
            return None
        if len(prompts) == len(groups) and self._uniform(prompts):
            return self._gathered_prefix(prompts, groups, batch_size)
        layers = sorted({layer for p in prompts.values() for layer in p})
        sample = next(iter(next(iter(prompts.values())).values()))[0]
        _, heads, _, head_dim = sample.shape
        prefix = {}
        for layer in layers:
            longest = max(p[layer][0].shape[2] for p in prompts.values() if layer in p)  # per-layer lengths differ
            key = sample.new_zeros(batch_size, heads, longest, head_dim)
            value = sample.new_zeros(batch_size, heads, longest, head_dim)
            visible = torch.zeros(batch_size, longest, dtype=torch.bool, device=sample.device)
            gates = []
            for name, prompt in prompts.items():
                if layer not in prompt:
                    continue  # this task has no prompt on this layer: its rows see no prefix columns here
                rows = torch.tensor(groups[name], device=sample.device)
                length = prompt[layer][0].shape[2]
                key[rows, :, :length] = prompt[layer][0][0]
                value[rows, :, :length] = prompt[layer][1][0]
                visible[rows, :length] = True
                if len(prompt[layer]) > 3 and prompt[layer][3] is not None:  # a gated prefix (APT): its own gate
                    gates.append((prompt[layer][3], rows, length))
            prefix[layer] = (key, value, visible, mixed_gate(gates, longest)) if gates else (key, value, visible)
        return prefix

    @staticmethod
    def _uniform(prompts: dict) -> bool:
        """Every prompt on the same layers with the same length per layer, none gated: no column is padding."""
        first = next(iter(prompts.values()))
        shape = {layer: kv[0].shape for layer, kv in first.items()}
        return all(
            {layer: kv[0].shape for layer, kv in prompt.items()} == shape
            and all(len(kv) < 4 or kv[3] is None for kv in prompt.values())
            for prompt in prompts.values()
        )

    @staticmethod
    def _gathered_prefix(prompts: dict, groups: dict[str, list[int]], batch_size: int):
        """{layer: (key, value)} (B, heads, P, head_dim): each row's own prefix gathered from the stacked prompts, one
        gather per layer (every column visible, so no mask)."""
        names = list(prompts)
        sample = next(iter(prompts[names[0]].values()))[0]
        owner = torch.empty(batch_size, dtype=torch.long)
        for number, name in enumerate(names):
            owner[groups[name]] = number
        owner = owner.to(sample.device)
        prefix = {}
        for layer in prompts[names[0]]:
            keys = torch.cat([prompts[name][layer][0] for name in names])  # (prompts, heads, P, head_dim)
            values = torch.cat([prompts[name][layer][1] for name in names])
            prefix[layer] = (keys.index_select(0, owner), values.index_select(0, owner))
        return prefix

    def _position_ids(self, groups: dict[str, list[int]], attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Per-row position ids when some served prompt numbers tokens after its prefix (shift_positions)."""
        config = self.encoder.config
        shifts = {}
        for name in groups:
            model = self._model_of(name)
            shifts[name] = model.prompt.length if model.shift_positions else 0
        if not any(shifts.values()) or family_of(config).positions == "relative":
            return None
        positions = torch.zeros_like(attention_mask)
        for name, rows in groups.items():
            # a task without the shift gets the stock numbering, written out (decoders refuse the shift at start-up)
            positions[rows] = position_ids(config, attention_mask[rows], shifts[name])
        return positions

    @torch.inference_mode()
    def classify(self, texts: list, tasks: list[str]) -> list[str]:
        """Label names for raw texts (a string or a (text_a, text_b) pair each) of classification tasks, served in
        one mixed batch; each text is truncated to its own task's max_length."""
        if len(texts) != len(tasks):
            raise UserError(f"classify: {len(texts)} text(s) and {len(tasks)} task name(s); give one task per text")
        if not texts:
            return []
        rows = []
        for number, (text, name) in enumerate(zip(texts, tasks, strict=True)):
            pair = (text, None) if isinstance(text, str) else tuple(text) if isinstance(text, (list, tuple)) else ()
            if not 1 <= len(pair) <= 2 or not isinstance(pair[0], str) or not isinstance(pair[-1], (str, type(None))):
                raise UserError(f"classify: text {number} is {text!r}; give a string or a (text_a, text_b) pair")
            if name not in self.owner:
                raise UserError(f"classify: task {name!r} is not served; served: {', '.join(sorted(self.owner))}")
            task = self._task_config(name)
            rows.append(self.tokenizer(*pair, truncation=True, max_length=task.max_length))
        batch = dict(self.tokenizer.pad(rows, return_tensors="pt"))
        device = next(self.encoder.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs = self(batch, tasks=tasks)
        return [
            str(self._task_config(name).labels[int(np.argmax(out.float().cpu().numpy()))])
            for out, name in zip(outputs, tasks, strict=True)
        ]

    def _task_config(self, head: str) -> DictConfig:
        model_name, head_name = self.owner[head]
        return dict(task_members(self.configs[model_name].task))[head_name]

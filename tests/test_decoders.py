"""Deep prompts on decoders (GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma, GLM, GLM-4) are exact: every layer's
attention against a hand-written reference, the whole model against the prefix-as-cache computation (the stock
model with the prefix in its key/value cache), no prefix against the stock model, left and right padding,
gradients, greedy generation; and every family trains end to end on the RTE, CoNLL03 and generation fixtures.

Tiny random configs of each family live in tests/fixtures/decoders/ (made by make_fixtures.py there)."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_only_prompt_and_head_get_gradients
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from ptv2.modeling import generation, injection
from ptv2.modeling.heads import ClassificationHead
from ptv2.modeling.model import PromptModel

FIXTURES = Path(__file__).parent / "fixtures"
DECODERS = FIXTURES / "decoders"
FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "glm", "glm4"]
PREFIX_LENGTH = 4
LENGTHS = (9, 6, 4)


def tiny_decoder(family: str, stock_attention: str = "sdpa"):
    """(stock causal LM, prompt-ready causal LM with the same weights), both in eval mode. Each model gets its own
    config copy: from_config writes the attention implementation into the config object it is given."""
    config = AutoConfig.from_pretrained(DECODERS / family)
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=stock_attention)
    prepared = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=injection.ATTENTION_KEY)
    prepared.load_state_dict(stock.state_dict())
    injection.prepare_encoder(prepared.base_model)
    return stock.eval(), prepared.eval()


def padded_batch(side: str, lengths=LENGTHS, seed: int = 1, vocab_size: int = 512):
    """input_ids / attention_mask (B, L) padded on `side`; the same tokens whichever the side."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        real = slice(width - length, width) if side == "left" else slice(0, length)
        input_ids[row, real] = torch.randint(1, vocab_size, (length,), generator=generator)
        mask[row, real] = 1
    return input_ids, mask


def random_prefix(config, seed: int = 2) -> injection.Prefix:
    num_layers, heads, head_dim = injection.encoder_shape(config)
    generator = torch.Generator().manual_seed(seed)
    return {
        layer: tuple(torch.randn(1, heads, PREFIX_LENGTH, head_dim, generator=generator) for _ in "kv")
        for layer in range(num_layers)
    }


def prefix_cache(config, prefix: injection.Prefix, batch_size: int) -> DynamicCache:
    """The prefix as a stock key/value cache, as if P earlier tokens had produced it."""
    cache = DynamicCache(config=config)
    for layer, (key, value) in prefix.items():
        cache.update(key.expand(batch_size, -1, -1, -1).clone(), value.expand(batch_size, -1, -1, -1).clone(), layer)
    return cache


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and (hasattr(m, "o_proj") or hasattr(m, "c_attn"))]


def reference_attention(module, hidden, position_embeddings, mask, prefix) -> torch.Tensor:
    """One decoder attention layer written out: projections, the family's own rotary function on the tokens only,
    keys/values [prefix; tokens] (repeated for grouped-query heads), causal + padding mask with every prefix column
    open, softmax in float64, output projection. hidden (B, L, hidden) -> (B, L, hidden)."""
    batch, length, _ = hidden.shape
    if hasattr(module, "c_attn"):  # GPT-2: fused Conv1D projection, learned positions (added before the layers)
        heads = module.num_heads
        query, key, value = (
            t.view(batch, length, heads, -1).transpose(1, 2) for t in module.c_attn(hidden).split(module.embed_dim, 2)
        )
        output = module.c_proj
    else:
        head_dim = module.head_dim
        query, key, value = (
            p(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
            for p in (module.q_proj, module.k_proj, module.v_proj)
        )
        if hasattr(module, "q_norm"):  # Qwen3: per-head RMS norm on queries and keys before the rotation
            query, key = module.q_norm(query), module.k_norm(key)
        cos, sin = position_embeddings
        query, key = sys.modules[type(module).__module__].apply_rotary_pos_emb(query, key, cos, sin)
        output = module.o_proj
    prefix_key, prefix_value = (t.expand(batch, -1, -1, -1) for t in prefix[module.layer_idx])
    key, value = torch.cat([prefix_key, key], 2), torch.cat([prefix_value, value], 2)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = (query.double() @ key.double().transpose(-1, -2)) * module.scaling
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    visible = causal[None] & mask.bool()[:, None, :]  # (B, L, L)
    visible = torch.cat([torch.ones(batch, length, PREFIX_LENGTH, dtype=torch.bool), visible], dim=-1)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    context = (torch.softmax(scores, -1) @ value.double()).float()
    return output(context.transpose(1, 2).reshape(batch, length, -1))


def valid(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return tensor[mask.bool()]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_matches_hand_written_attention(family):
    """Hooks record each attention layer's inputs and output during an injected, left-padded forward; the
    hand-written layer on the same inputs gives the same output."""
    _, model = tiny_decoder(family)
    input_ids, mask = padded_batch("left")
    prefix = random_prefix(model.config)
    records = []

    def record(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        records.append((module, hidden, kwargs.get("position_embeddings"), output[0]))

    hooks = [m.register_forward_hook(record, with_kwargs=True) for m in attention_modules(model)]
    with torch.no_grad():
        injection.run_encoder(model.base_model, prefix, input_ids=input_ids, attention_mask=mask)
        for hook in hooks:
            hook.remove()
        assert len(records) == model.config.num_hidden_layers
        worst = max(
            (valid(out, mask) - valid(reference_attention(m, h, pe, mask, prefix), mask)).abs().max().item()
            for m, h, pe, out in records
        )
    assert worst <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_equals_the_prefix_as_cache_computation(family):
    """The whole model: ours equals the stock eager model given the prefix as its key/value cache (mask P + L,
    token positions from 0), left-padded."""
    stock, model = tiny_decoder(family, stock_attention="eager")
    input_ids, mask = padded_batch("left")
    prefix = random_prefix(model.config)
    with torch.no_grad():
        ours = injection.run_encoder(model.base_model, prefix, input_ids=input_ids, attention_mask=mask)
        cached = stock.base_model(
            input_ids=input_ids,
            attention_mask=torch.cat([torch.ones(len(LENGTHS), PREFIX_LENGTH, dtype=torch.long), mask], 1),
            position_ids=positions(mask),
            cache=prefix_cache(stock.config, prefix, len(LENGTHS)),
            use_cache=True,
        ).last_hidden_state
    assert (valid(ours, mask) - valid(cached, mask)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_no_prefix_is_bit_identical_to_stock(family, side):
    stock, model = tiny_decoder(family)
    input_ids, mask = padded_batch(side)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions(mask)}
    with torch.no_grad():
        assert torch.equal(stock.base_model(**inputs).last_hidden_state, model.base_model(**inputs).last_hidden_state)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_is_respected(family, side):
    """Each row of a padded batch equals the same example run alone (with the prefix)."""
    _, model = tiny_decoder(family)
    input_ids, mask = padded_batch(side)
    prefix = random_prefix(model.config)
    with torch.no_grad():
        batched = injection.run_encoder(model.base_model, prefix, input_ids=input_ids, attention_mask=mask)
        for row in range(len(LENGTHS)):
            real = mask[row].bool()
            alone = injection.run_encoder(
                model.base_model, prefix, input_ids=input_ids[row, real][None], attention_mask=mask[row, real][None]
            )
            assert (batched[row, real] - alone[0]).abs().max().item() <= 1e-5


def prompt_cfg(**overrides):
    base = dict(method="ptv2", length=PREFIX_LENGTH, projection="none", projection_dim=16, dropout=0.0, layers="all")
    return OmegaConf.create({**base, "shift_positions": False, "encoder": "lstm", **overrides})


@pytest.mark.parametrize("family", FAMILIES)
def test_only_prompt_and_head_get_gradients_and_the_head_reads_the_last_token(family):
    _, causal_lm = tiny_decoder(family)
    model = PromptModel(causal_lm.base_model, prompt_cfg(), {"t": (ClassificationHead, 3)}, head_dropout=0.0)
    input_ids, mask = padded_batch("right")
    logits = model({"input_ids": input_ids, "attention_mask": mask})
    model.head_for(None).loss(logits, {"labels": torch.tensor([0, 1, 2])}).backward()
    assert_only_prompt_and_head_get_gradients(model)
    # every layer's prefix is reached (the embedding's columns are layer-major)
    per_layer = model.prompt.embedding.weight.grad.view(PREFIX_LENGTH, causal_lm.config.num_hidden_layers, -1)
    assert (per_layer.abs().sum(dim=(0, 2)) > 0).all()
    # the same examples left-padded: the head reads each row's last real token, so the logits agree
    model.eval()
    with torch.no_grad():
        right = model({"input_ids": input_ids, "attention_mask": mask})
        left_ids, left_mask = padded_batch("left")
        left = model({"input_ids": left_ids, "attention_mask": left_mask})
    assert torch.equal(left_ids[left_mask.bool()], input_ids[mask.bool()])
    assert (right - left).abs().max().item() <= 1e-5


def greedy_with_prefix_cache(stock, prefix, input_ids, mask, steps: int) -> torch.Tensor:
    """Reference decoding: the stock model, the prefix in its cache, token positions from 0, one token a step."""
    batch = input_ids.shape[0]
    cache = prefix_cache(stock.config, prefix, batch)
    full_mask = torch.cat([torch.ones(batch, PREFIX_LENGTH, dtype=torch.long), mask], 1)
    position, ids, tokens = positions(mask), input_ids, []
    for _ in range(steps):
        logits = stock(input_ids=ids, attention_mask=full_mask, position_ids=position, cache=cache, use_cache=True)
        ids = logits.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(ids)
        full_mask = torch.cat([full_mask, torch.ones(batch, 1, dtype=torch.long)], 1)
        position = position[:, -1:] + 1
    return torch.cat(tokens, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_prefix_equals_prefix_as_cache(family):
    stock, model = tiny_decoder(family, stock_attention="eager")
    input_ids, mask = padded_batch("left")
    prefix = random_prefix(model.config)
    no_end = [-1]  # never stop early: compare all steps
    with torch.no_grad():
        ours = generation.generate_greedy(model.base_model, model.lm_head, prefix, input_ids, mask, 6, no_end)
        expected = greedy_with_prefix_cache(stock, prefix, input_ids, mask, 6)
        assert torch.equal(ours, expected)
        # Without a prefix the loop is transformers' own greedy search.
        plain = generation.generate_greedy(model.base_model, model.lm_head, None, input_ids, mask, 6, no_end)
        stock.generation_config.eos_token_id = None
        reference = stock.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert torch.equal(plain, reference[:, input_ids.shape[1] :])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_keeps_the_prefix(family):
    _, causal_lm = tiny_decoder(family)
    model = PromptModel(causal_lm.base_model, prompt_cfg(), {"t": (ClassificationHead, 2)}, head_dropout=0.0).train()
    for module in model.modules():  # a deterministic training-mode forward (GPT-2 has dropout)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    input_ids, mask = padded_batch("right")
    batch = {"input_ids": input_ids, "attention_mask": mask}
    plain = model(batch)
    plain.sum().backward()
    expected = model.prompt.embedding.weight.grad.clone()
    model.zero_grad()
    model.encoder.activation_checkpointing_enable({"use_reentrant": False})
    checkpointed = model(batch)
    checkpointed.sum().backward()
    assert (plain - checkpointed).abs().max().item() <= 1e-6
    assert (model.prompt.embedding.weight.grad - expected).abs().max().item() <= 1e-6


# ------------------------------------------------------------------------------------- end to end on the fixtures
TASKS = {
    "rte": ["task=rte", f"task.data_dir={FIXTURES / 'rte_small'}"],
    "rte-verbalizer": ["task=rte", f"task.data_dir={FIXTURES / 'rte_small'}", "task.head=verbalizer"],
    "conll03": [
        "task=conll03",
        f"task.data_dir={FIXTURES / 'tagging'}",
        *(f"task.files.{split}=conll03_iob1.txt" for split in ("train", "dev", "test")),
    ],
    "squad": [
        "task=squad",
        f"task.data_dir={FIXTURES / 'squad'}",
        "task.max_length=256",
    ],  # GPT-2 fixture: 256 positions
    "generation": ["task=generation", f"task.data_dir={FIXTURES / 'generation'}", "task.options.max_new_tokens=4"],
}
METRICS = {"rte": "accuracy", "rte-verbalizer": "accuracy", "conll03": "f1", "squad": "f1", "generation": "rougeL"}
TOP = {"squad": 100.0}  # SQuAD's official script scores in percent


def decoder_overrides(family: str) -> list[str]:
    return [
        "backbone=tiny",
        f"backbone.name=tiny-{family}",
        f"backbone.name_or_path={DECODERS / family}",
        f"backbone.tokenizer={DECODERS / 'tokenizer'}",
        "trainer=smoke",
        "logger=none",
        "trainer.save_checkpoint=false",
        "prompt.length=4",
    ]


def train_run(overrides: list[str], run_dir: Path) -> dict:
    """`ptv2 train` in this process (conftest.ptv2), its results.json."""
    from conftest import ptv2

    ptv2("train", *overrides, f"hydra.run.dir={run_dir}")
    return json.loads((run_dir / "results.json").read_text())


# The default suite trains each family on one task and each task on at least one family (the numerics of every
# family are proven above, without the CLI); `make test-all` runs the whole family x task matrix.
ONE_TASK_EACH = {family: list(TASKS)[index % len(TASKS)] for index, family in enumerate(FAMILIES)}


@pytest.mark.parametrize(
    ("family", "task"),
    [
        pytest.param(family, task, marks=() if ONE_TASK_EACH[family] == task else pytest.mark.slow)
        for family in FAMILIES
        for task in TASKS
    ],
)
def test_every_family_trains_on_rte_conll03_squad_and_generation(family, task, tmp_path):
    results = train_run([*decoder_overrides(family), *TASKS[task]], tmp_path / task)
    assert results["steps"] >= 1 and 0.0 <= results["best"][METRICS[task]] <= TOP.get(task, 1.0), task
    assert 0 < results["trainable_params"] < results["total_params"]
    if task == "generation":  # the LM head stays frozen: only the prompt trains
        layers, heads, head_dim = injection.encoder_shape(AutoConfig.from_pretrained(DECODERS / family))
        assert results["trainable_params"] == PREFIX_LENGTH * layers * 2 * heads * head_dim


def test_the_default_matrix_covers_every_family_and_task():
    assert set(ONE_TASK_EACH) == set(FAMILIES) and set(ONE_TASK_EACH.values()) == set(TASKS)


def test_generation_trains_then_predict_writes_generations(tmp_path):
    """`ptv2 train task=generation` then `ptv2 predict`: metrics in results.json, one generation per dev example."""
    from conftest import ptv2

    run_dir = tmp_path / "run"
    results = train_run([*decoder_overrides("llama"), *TASKS["generation"], "trainer.save_checkpoint=true"], run_dir)
    assert set(results["best"]) == {"rougeL", "bleu4", "exact_match"}
    folders = [f"backbone.name_or_path={DECODERS / 'llama'}", f"backbone.tokenizer={DECODERS / 'tokenizer'}"]
    ptv2(
        "predict",
        f"ckpt={run_dir}",
        "split=dev",
        f"task.data_dir={FIXTURES / 'generation'}",
        *folders,
        f"output_dir={tmp_path}",
    )
    lines = (tmp_path / "generation-dev-generations.jsonl").read_text().splitlines()
    dev = (FIXTURES / "generation" / "dev.jsonl").read_text().splitlines()
    assert len(lines) == len(dev)
    first = json.loads(lines[0])
    assert set(first) == {"idx", "prompt", "prediction", "response"} and first["prompt"] == json.loads(dev[0])["prompt"]


def test_encoder_refuses_generation_and_shifted_positions_refuse_decoders(tmp_path):
    from conftest import ptv2

    encoder = ptv2("train", "backbone=tiny", "trainer=smoke", "logger=none", *TASKS["generation"], check=False)
    assert encoder.returncode != 0 and "needs a decoder backbone" in encoder.stderr
    shifted = ptv2("train", *decoder_overrides("llama"), *TASKS["rte"], "prompt.shift_positions=true", check=False)
    assert shifted.returncode != 0 and "shift_positions" in shifted.stderr


def test_bf16_backbone_with_gradient_checkpointing_trains(tmp_path):
    """Big-model options: frozen bf16 weights (fp32 prompt and heads) and activation checkpointing, end to end."""
    for task in ("rte", "generation"):
        options = ["backbone.dtype=bfloat16", "backbone.gradient_checkpointing=true"]
        results = train_run([*decoder_overrides("llama"), *TASKS[task], *options], tmp_path / task)
        assert results["steps"] == 2 and all(record["train_loss"] > 0 for record in results["history"])


def test_fsdp2_shards_the_frozen_backbone_and_trains_the_prompt():
    """What conf/accelerate/fsdp.yaml asks of torch (FSDP2, one unit per decoder layer), on 2 CPU processes."""
    from conftest import free_port
    from forked_ptv2 import ForkedProcess

    world = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    script = [str(Path(__file__).parent / "fsdp_check.py")]
    ranks = [
        ForkedProcess(script, {**os.environ, **world, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in range(2)
    ]
    for done in [rank.wait() for rank in ranks]:
        assert done.returncode == 0, done.stderr[-3000:]
        assert "prompt gradient difference" in done.stdout


@pytest.mark.slow
def test_two_process_accelerate_run_trains_a_decoder(tmp_path):
    """`accelerate launch --num_processes 2` (gloo on a CPU: accelerate turns the FSDP config into plain data
    parallelism there) trains the generation task; only the main process writes the run directory."""
    import subprocess

    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "conf/accelerate/fsdp.yaml"]
    overrides = [*decoder_overrides("llama"), *TASKS["generation"], "trainer.cpu=true", f"hydra.run.dir={tmp_path}"]
    command = [*accelerate, "--num_processes", "2", "-m", "ptv2", "train", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rougeL" in json.loads((tmp_path / "results.json").read_text())["best"]


def test_remote_code_glm_is_refused_with_its_native_replacement(tmp_path):
    """The paper's GLM-10B config (remote code, model type "glm" like transformers' native GLM-4) is refused."""
    from ptv2.errors import UserError
    from ptv2.modeling import backbone

    config = {"model_type": "glm", "architectures": ["GLMModel"], "num_layers": 48, "hidden_size": 4096}
    config["auto_map"] = {"AutoConfig": "configuration_glm.GLMConfig", "AutoModel": "modeling_glm.GLMModel"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = OmegaConf.create(
        {"name_or_path": str(tmp_path), "revision": None, "dropout": None, "attention_dropout": None}
    )
    with pytest.raises(UserError, match="remote code.*glm-4-9b"):
        backbone.load_config(cfg)


@pytest.mark.parametrize("arm", ["ptv2", "lora", "peft_prefix"])
def test_gpu_anchor_arms_run_with_tiny_sizes(arm):
    """scripts/gpu_anchor.py's arms (the GPU figures come from the same code at full size)."""
    pytest.importorskip("peft")
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import gpu_anchor

    result = gpu_anchor.run_arm(arm, gpu_anchor.SMALL, "cpu")
    assert result["trainable_params"] > 0 and result["step_seconds_median"] > 0 and math.isfinite(result["loss"])

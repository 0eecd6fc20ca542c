"""prompt=lora and prompt=peft_prefix (PEFT on ptv2's frozen backbone) and `ptv2 export --to peft`: exactness
against hand-written references (merged LoRA weights; ptv2's own shifted prefix), gradients and optimizer state only
where expected, one-line refusals, and the CLI end to end on the CoNLL03 fixture."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import FAMILY_CONFIGS, FIXTURES, padded_batch, ptv2, tiny_encoder
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from ptv2.errors import UserError
from ptv2.modeling import injection
from ptv2.modeling.heads import TokenClassificationHead
from ptv2.modeling.methods import METHODS
from ptv2.modeling.model import PromptModel
from ptv2.modeling.peft_methods import require_peft
from ptv2.optim import make_optimizer

peft = pytest.importorskip("peft")

DECODERS = FIXTURES / "decoders"
CONLL03 = [
    "task=conll03",
    f"task.data_dir={FIXTURES / 'tagging'}",
    *(f"task.files.{split}=conll03_iob1.txt" for split in ("train", "dev", "test")),
]


def prompt_cfg(**values):
    return OmegaConf.structured(METHODS[values["method"]].settings(**values))


def tagger(encoder, **values) -> PromptModel:
    torch.manual_seed(3)
    return PromptModel(encoder, prompt_cfg(**values), {"tag": (TokenClassificationHead, 5)}, 0.0).eval()


def batch_of(lengths=(9, 6, 4), vocab_size=120) -> dict:
    input_ids, attention_mask = padded_batch(lengths, vocab_size=vocab_size)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ------------------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("family", ["bert", "roberta", "deberta-v2"])
def test_lora_equals_the_stock_model_with_merged_weights(family):
    stock, prepared = tiny_encoder(family)
    model = tagger(prepared, method="lora", r=4, alpha=8.0, dropout=0.0)
    batch = batch_of()
    head = model.heads["tag"]
    # B starts at zero: an untrained adapter is the stock model.
    assert torch.equal(model(batch), head(stock(**batch).last_hidden_state, batch))

    adapted = [(name, module) for name, module in model.encoder.named_modules() if hasattr(module, "lora_B")]
    targets = injection.family_of(stock.config).lora_targets
    assert adapted and all(name.endswith(targets) for name, _ in adapted)
    merged = dict(stock.named_modules())
    with torch.no_grad():
        for name, module in adapted:
            module.lora_B["default"].weight.normal_(0, 0.5)
            update = module.lora_B["default"].weight @ module.lora_A["default"].weight  # (out, in)
            merged[name].weight += (
                8.0 / 4
            ) * update  # the reference: W + (alpha / r) B A, written into the stock model
    reference = head(stock(**batch).last_hidden_state, batch)
    assert (model(batch) - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_lora_targets_each_decoder_family_default(family):
    config = AutoConfig.from_pretrained(DECODERS / family)
    encoder = AutoModel.from_config(config, attn_implementation=injection.attention_key(config))
    injection.prepare_encoder(encoder)
    model = tagger(encoder, method="lora", dropout=0.0)
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.encoder.named_modules() if hasattr(module, "lora_A")}
    expected = {"c_attn", "c_proj"} if family == "gpt2" else {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert adapted == expected
    if family == "gpt2":  # "attn.c_proj": the MLP's c_proj stays as it was
        assert not any(hasattr(m, "lora_A") for n, m in model.encoder.named_modules() if n.endswith("mlp.c_proj"))
    batch = batch_of(vocab_size=config.vocab_size)
    assert model(batch).shape == (3, 9, 5)


def test_lora_trains_only_adapters_and_heads_and_the_optimizer_holds_nothing_else():
    _, prepared = tiny_encoder("bert")
    model = tagger(prepared, method="lora", dropout=0.0).train()
    with torch.no_grad():  # B = 0 would leave A without gradient in the first step
        for module in model.encoder.modules():
            if hasattr(module, "lora_B"):
                module.lora_B["default"].weight.normal_(0, 0.1)
    batch = batch_of()
    model(batch).sum().backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, parameter in model.named_parameters():
        if ".lora_" in name or name.startswith("heads."):
            assert name in trainable and parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert name not in trainable and parameter.grad is None, name
    optimizer = make_optimizer(
        OmegaConf.create(
            {"optimizer": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0}}
        ),
        (p for p in model.parameters() if p.requires_grad),
    )
    optimizer.step()
    with_state = {id(p) for p in optimizer.state}
    assert with_state == {id(p) for name, p in model.named_parameters() if name in trainable}
    # The checkpoint holds exactly the adapter and the head.
    assert set(model.prompt_state_dict()) == trainable


def test_lora_with_a_target_the_backbone_lacks_fails_in_one_line():
    _, prepared = tiny_encoder("bert")
    with pytest.raises(UserError, match=r"prompt.target_modules=\['q_proj'\] does not fit backbone bert"):
        tagger(prepared, method="lora", target_modules=["q_proj"])


def test_a_missing_peft_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(UserError, match=r"prompt.method=lora needs PEFT.*pip install 'ptv2\[lora\]'"):
        require_peft("lora")


# ------------------------------------------------------------------------------------------ PEFT prefix tuning
@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
def test_peft_prefix_equals_ptv2_with_shifted_positions(family):
    """The independent implementation and ptv2's compute the same function for the same prefix values: PEFT passes
    the prefix as a cache (tokens numbered from P), ptv2 injects it in attention with shift_positions=true."""
    _, ours_encoder = tiny_encoder(family)
    _, peft_encoder = tiny_encoder(family)
    ours = tagger(ours_encoder, method="ptv2", length=4, dropout=0.0, shift_positions=True, init_std=1.0)
    theirs = tagger(peft_encoder, method="peft_prefix", length=4)
    with torch.no_grad():
        theirs.encoder.prompt_encoder["default"].embedding.weight.copy_(ours.prompt.embedding.weight)
        theirs.heads.load_state_dict(ours.heads.state_dict())
    assert {n for n, p in theirs.named_parameters() if p.requires_grad} == {
        "encoder.prompt_encoder.default.embedding.weight",
        "heads.tag.linear.weight",
        "heads.tag.linear.bias",
    }
    batch = batch_of()
    real = batch["attention_mask"].bool()
    assert (ours(batch)[real] - theirs(batch)[real]).abs().max().item() <= 1e-5


def refused(overrides: list[str], tmp_path) -> str:
    result = ptv2(
        "train",
        "backbone=tiny",
        "trainer=smoke",
        "logger=none",
        *CONLL03,
        *overrides,
        f"hydra.run.dir={tmp_path}",
        check=False,
    )
    assert result.returncode == 2 and not (tmp_path / "results.json").exists()
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["backbone.gradient_checkpointing=true"], "drops the key/value cache, and PEFT's prefix with it"),
        (["backbone.dtype=bfloat16"], "use backbone.dtype=float32 with trainer.precision=bf16"),
    ],
)
def test_peft_prefix_refuses_what_peft_cannot_do_in_one_line(tmp_path, overrides, message):
    line = refused(["prompt=peft_prefix", *overrides], tmp_path)
    assert line.startswith("ptv2: error: prompt.method=peft_prefix: ") and message in line


@pytest.mark.parametrize("override", ["prompt.dropout=0.1", "prompt.layers=top:1"])
def test_peft_prefix_has_no_prefix_dropout_or_depth(tmp_path, override):
    line = refused(["prompt=peft_prefix", override], tmp_path)
    key = override.split("=")[0]
    assert line.startswith(f"ptv2: error: {key} is not a setting of prompt=peft_prefix; it is one of ptv2")


def test_peft_prefix_refuses_deberta(tmp_path):
    from ptv2.modeling.peft_methods import peft_prefix_refusal

    config = FAMILY_CONFIGS["deberta-v2"]()
    line = peft_prefix_refusal(prompt_cfg(method="peft_prefix"), OmegaConf.create({}), {"linear"}, config)
    assert "which DeBERTa-v2 does not have" in line
    assert "task.head=lm" in peft_prefix_refusal(
        prompt_cfg(method="peft_prefix"), OmegaConf.create({}), {"lm"}, FAMILY_CONFIGS["bert"]()
    )


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("method", ["lora", "peft_prefix"])
def test_train_eval_on_the_conll03_fixture(tmp_path, method):
    run_dir = tmp_path / "run"
    ptv2(
        "train",
        "backbone=tiny",
        "trainer=smoke",
        "logger=none",
        *CONLL03,
        f"prompt={method}",
        f"hydra.run.dir={run_dir}",
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == method and results["steps"] >= 1 and "test_at_best" in results
    assert 0 < results["trainable_params"] < results["total_params"] / 10
    with safe_open(str(run_dir / "prompt.safetensors"), framework="pt") as saved:
        names = set(saved.keys())
    adapter = {n for n in names if not n.startswith("heads.")}
    expected = ".lora_A.default.weight" if method == "lora" else "encoder.prompt_encoder.default.embedding.weight"
    assert adapter and all(n.endswith(expected) or ".lora_B." in n for n in adapter)
    assert {"heads.conll03.linear.weight", "heads.conll03.linear.bias"} <= names

    eval_dir = tmp_path / "eval"
    ptv2("eval", f"ckpt={run_dir}", *CONLL03[1:], f"hydra.run.dir={eval_dir}")
    evaluation = json.loads((eval_dir / "eval.json").read_text())
    assert evaluation["metrics"]["f1"] == results["best"]["f1"]


def test_lora_does_not_pack_and_says_why():
    from ptv2.commands.packed import unpacked_reason

    cfg = OmegaConf.create({"prompt": {"method": "lora"}, "trainer": {"precision": "no"}, "task": {"name": "x"}})
    assert unpacked_reason(cfg).startswith("prompt.method=lora changes the backbone or its input")


# ------------------------------------------------------------------------------- rotary keys for export
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "glm", "glm4"])
def test_rotary_prefix_keys_rotated_by_p_give_peft_ptv2s_hidden_states(family):
    """ptv2 numbers a decoder's tokens from 0 with unrotated prefix keys, PEFT from P with the keys as they are: the
    exported keys, rotated by position P, give every score ptv2's (right-padded rows); unrotated they do not."""
    from ptv2.modeling.peft_methods import rotated_keys

    config = AutoConfig.from_pretrained(DECODERS / family)
    torch.manual_seed(0)
    encoder = AutoModel.from_config(config, attn_implementation=injection.attention_key(config))
    injection.prepare_encoder(encoder)
    stock = AutoModel.from_config(config)
    stock.load_state_dict(encoder.state_dict())
    ours = tagger(encoder, method="ptv2", length=4, dropout=0.0, init_std=1.0)
    prefix = ours.prompt.embedding.weight.detach()
    config_peft = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4)
    theirs = peft.get_peft_model(stock.eval(), config_peft).eval()
    batch = batch_of(vocab_size=config.vocab_size)
    real = batch["attention_mask"].bool()
    differences = []
    with torch.no_grad():
        expected = injection.run_encoder(encoder, ours.prompt(3), **batch)[real]
        for exported in (rotated_keys(prefix, config), prefix):
            theirs.prompt_encoder["default"].embedding.weight.copy_(exported)
            differences.append((theirs(**batch).last_hidden_state[real] - expected).abs().max().item())
    assert differences[0] <= 1e-5 and differences[1] > 1e-2
    # ptv2 import rotates them back.
    assert (rotated_keys(rotated_keys(prefix, config), config, inverse=True) - prefix).abs().max().item() <= 1e-5


def test_lora_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path):
    """The adapter goes through ptv2's training state like any prompt: SIGKILL mid-epoch 2, resume, same run (LoRA
    dropout on, so the random state has to come back too)."""
    from test_resume import assert_same_run, train

    reference, killed_dir = tmp_path / "reference", tmp_path / "killed"
    assert train("prompt=lora", f"hydra.run.dir={reference}").returncode == 0
    assert train("prompt=lora", f"hydra.run.dir={killed_dir}", die_at=9).returncode == -9
    resumed = train("prompt=lora", f"hydra.run.dir={killed_dir}", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(killed_dir, reference)
    assert any(".lora_A." in name for name in load_file(str(reference / "prompt.safetensors")))

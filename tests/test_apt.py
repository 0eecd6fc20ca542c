"""Adaptive Prefix Tuning (prompt.method=apt) and per-layer prompt lengths: exact against P-Tuning v2 with the gates
open, against a hand-computed gate with them shut partway, on encoders and decoders; gradients reach exactly the
prompt, its gates and the head; packing and serving give each job its own gates and lengths."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FAMILY_CONFIGS,
    assert_only_prompt_and_head_get_gradients,
    markdown_rows,
    padded_batch,
    tiny_encoder,
)
from omegaconf import OmegaConf
from test_decoders import padded_batch as decoder_batch
from test_decoders import tiny_decoder

from ptv2.modeling import injection
from ptv2.modeling.heads import ClassificationHead
from ptv2.modeling.methods.apt.module import AdaptivePrefixEncoder
from ptv2.modeling.model import PromptModel
from ptv2.modeling.packing import packed_hidden

ENCODERS = list(FAMILY_CONFIGS)
DECODERS = ["gpt2", "llama", "qwen3"]
LENGTH = 4
OPEN = 40.0  # sigmoid(40) is exactly 1.0 in float32: a gate bias that holds the token gates open


def prompt_cfg(**overrides):
    base = dict(method="apt", length=LENGTH, projection="none", projection_dim=16, dropout=0.0, layers="all")
    base["init_std"] = 1.0  # prefixes large enough to move the outputs of a random tiny encoder
    return OmegaConf.create({**base, "shift_positions": False, "encoder": "lstm", **overrides})


def model_for(encoder, seed: int = 3, head: str = "t", **overrides) -> PromptModel:
    torch.manual_seed(seed)
    return PromptModel(encoder, prompt_cfg(**overrides), {head: (ClassificationHead, 3)}, head_dropout=0.0).eval()


def pad_for(family: str) -> int:
    return 1 if family == "roberta" else 0


def open_gates(model: PromptModel) -> None:
    with torch.no_grad():
        for linear in model.prompt.token_gates:
            linear.weight.zero_()
            linear.bias.fill_(OPEN)
        model.prompt.layer_gates.fill_(1.0)


def ptv2_twin(model: PromptModel, encoder, **overrides) -> PromptModel:
    """A ptv2 model with the APT model's prefix and head (the gates dropped)."""
    twin = model_for(encoder, method="ptv2", **overrides)
    state = {k: v for k, v in model.state_dict().items() if "gates" not in k and not k.startswith("encoder.")}
    twin.load_state_dict(state, strict=False)
    return twin


@pytest.mark.parametrize("family", ENCODERS)
def test_gates_open_equal_ptv2_on_encoders(family):
    _, encoder = tiny_encoder(family)
    apt = model_for(encoder)
    assert isinstance(apt.prompt, AdaptivePrefixEncoder)
    open_gates(apt)
    ptv2 = ptv2_twin(apt, encoder)
    input_ids, mask = padded_batch(pad_id=pad_for(family))
    batch = {"input_ids": input_ids, "attention_mask": mask}
    with torch.no_grad():
        gap = (apt(batch) - ptv2(batch)).abs().max().item()
        # and the gates do something when not held open (lambda halves every prefix)
        apt.prompt.layer_gates.fill_(0.5)
        moved = (apt(batch) - ptv2(batch)).abs().max().item()
    assert gap <= 1e-6, gap
    assert moved > 1e-4


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_gates_open_equal_ptv2_on_decoders(family, side):
    _, causal_lm = tiny_decoder(family)
    apt = model_for(causal_lm.base_model)
    open_gates(apt)
    ptv2 = ptv2_twin(apt, causal_lm.base_model)
    input_ids, mask = decoder_batch(side)
    batch = {"input_ids": input_ids, "attention_mask": mask}
    with torch.no_grad():
        assert (apt(batch) - ptv2(batch)).abs().max().item() <= 1e-6


def expected_weights(model: PromptModel, index: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """lambda * sigmoid(W mean_real(h) + b), written out one example at a time."""
    linear = model.prompt.token_gates[index]
    rows = []
    for b in range(hidden.shape[0]):
        pooled = hidden[b, mask[b].bool()].mean(dim=0)
        rows.append(model.prompt.layer_gates[index] * torch.sigmoid(linear.weight @ pooled + linear.bias))
    return torch.stack(rows)


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta-v2"])
@pytest.mark.parametrize("layers", ["bottom:1", "top:1"])
def test_gates_weigh_each_prefix_token_by_the_layer_input(family, layers):
    """One prompted layer: its input is the unprompted encoder's hidden state there, so the gate can be computed
    by hand (masked mean, linear, sigmoid, scale) and the APT model must equal ptv2 with the prefix so weighted."""
    _, encoder = tiny_encoder(family)
    apt = model_for(encoder, layers=layers)
    with torch.no_grad():
        for linear in apt.prompt.token_gates:
            linear.weight.normal_(0, 0.5)
            linear.bias.normal_(0, 0.5)
        apt.prompt.layer_gates.fill_(0.7)
    input_ids, mask = padded_batch(pad_id=pad_for(family))
    (layer,) = apt.prompt.layers
    with torch.no_grad():
        stock = encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        weights = expected_weights(apt, 0, stock[layer], mask)[:, None, :, None]  # (B, 1, P, 1)
        entry = apt.prompt(input_ids.shape[0])[layer]
        reference = injection.run_encoder(
            encoder, {layer: (entry[0] * weights, entry[1] * weights)}, input_ids=input_ids, attention_mask=mask
        )
        hidden = injection.run_encoder(
            encoder, apt.prompt(input_ids.shape[0]), input_ids=input_ids, attention_mask=mask
        )
    real = mask.bool()
    assert (hidden[real] - reference[real]).abs().max().item() <= 1e-5
    assert weights.std() > 1e-3  # the weights differ by token and example: the test is not of a constant gate


def test_the_gate_ignores_padding_and_padding_side_on_a_decoder():
    _, causal_lm = tiny_decoder("llama")
    apt = model_for(causal_lm.base_model)
    with torch.no_grad():
        for linear in apt.prompt.token_gates:
            linear.weight.normal_(0, 0.5)
    outputs = []
    with torch.no_grad():
        for side in ("left", "right"):
            input_ids, mask = decoder_batch(side)
            outputs.append(apt({"input_ids": input_ids, "attention_mask": mask}))
    assert (outputs[0] - outputs[1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
def test_only_prompt_gates_and_head_get_gradients(family):
    _, encoder = tiny_encoder(family)
    model = model_for(encoder, length=[2, 3, 4]).train()
    input_ids, mask = padded_batch(pad_id=pad_for(family))
    logits = model({"input_ids": input_ids, "attention_mask": mask})
    model.head_for(None).loss(logits, {"labels": torch.tensor([0, 1, 2])}).backward()
    assert_only_prompt_and_head_get_gradients(model)  # token gates and layer gates included
    assert {name for name, _ in model.prompt.named_parameters()} >= {"layer_gates", "token_gates.2.weight"}


def test_decoder_gates_get_gradients():
    _, causal_lm = tiny_decoder("qwen3")
    model = model_for(causal_lm.base_model).train()
    input_ids, mask = decoder_batch("left")
    logits = model({"input_ids": input_ids, "attention_mask": mask})
    model.head_for(None).loss(logits, {"labels": torch.tensor([0, 1, 2])}).backward()
    assert_only_prompt_and_head_get_gradients(model)


# ------------------------------------------------------------------------------------------ per-layer lengths
HIDDEN, HEADS, HEAD_DIM, LAYERS = 32, 4, 8, 3


@pytest.mark.parametrize("method", ["ptv2", "apt"])
@pytest.mark.parametrize("projection", ["none", "mlp"])
def test_trainable_parameters_follow_per_layer_lengths(method, projection):
    _, encoder = tiny_encoder("bert")
    lengths = [1, 2, 5]
    model = model_for(encoder, method=method, length=lengths, projection=projection)
    prefix = sum(lengths) * (HIDDEN if projection == "mlp" else 2 * HEADS * HEAD_DIM)
    mlp = (HIDDEN * 16 + 16) + (16 * LAYERS * 2 * HIDDEN + LAYERS * 2 * HIDDEN) if projection == "mlp" else 0
    gates = sum(lengths) * (HIDDEN + 1) + LAYERS if method == "apt" else 0
    head = HIDDEN * 3 + 3
    assert model.parameter_counts()["trainable_params"] == prefix + mlp + gates + head
    shapes = {layer: (key.shape, value.shape) for layer, (key, value, *_) in model.prompt(2).items()}
    assert shapes == {i: ((2, HEADS, length, HEAD_DIM),) * 2 for i, length in enumerate(lengths)}


def test_equal_per_layer_lengths_are_the_single_length():
    _, encoder = tiny_encoder("bert")
    single, listed = model_for(encoder, method="ptv2"), model_for(encoder, method="ptv2", length=[LENGTH] * LAYERS)
    assert single.state_dict().keys() == listed.state_dict().keys()
    assert all(torch.equal(single.state_dict()[k], v) for k, v in listed.state_dict().items())


@pytest.mark.parametrize("projection", ["none", "mlp"])
def test_per_layer_lengths_take_each_layers_own_rows(projection):
    """Layer i's prefix is rows sum(P_<i) .. sum(P_<=i) of the key/values (the MLP's output for layer i)."""
    _, encoder = tiny_encoder("bert")
    model = model_for(encoder, method="ptv2", length=[1, 2, 5], projection=projection)
    table = model.prompt.key_values().detach()
    width = 2 * HEADS * HEAD_DIM
    start = 0
    for i, (key, value) in model.prompt(1).items():
        rows = table[start : start + key.shape[2]]
        rows = rows[:, i * width : (i + 1) * width] if projection == "mlp" else rows
        start += key.shape[2]
        pairs = rows.view(-1, 2, HEADS, HEAD_DIM).permute(1, 2, 0, 3)  # (2, heads, P, head_dim)
        assert torch.equal(key[0], pairs[0]) and torch.equal(value[0], pairs[1])


def test_folded_mlp_prefix_with_per_layer_lengths_equals_the_mlp():
    """Checkpoints store the MLP's output (the folded prefix) for inference: with per-layer lengths it must give
    the same prefixes as the MLP."""
    _, encoder = tiny_encoder("bert")
    model = model_for(encoder, length=[1, 2, 5], projection="mlp")
    input_ids, mask = padded_batch()
    batch = {"input_ids": input_ids, "attention_mask": mask}
    with torch.no_grad():
        through_mlp = model(batch)
        model.prompt.folded = model.prompt.fold()
        assert torch.equal(model(batch), through_mlp)


def test_packed_apt_and_ptv2_with_different_lengths_equal_separate_runs():
    """Three jobs on one backbone forward: APT with per-layer lengths, APT with one length (gates of their own,
    not open), ptv2 on the top layer only; each block equals that job's own forward (training mode, no dropout)."""
    _, encoder = tiny_encoder("bert")
    jobs = [
        model_for(encoder, seed=4, length=[1, 3, 2]),
        model_for(encoder, seed=5, length=5),
        model_for(encoder, seed=6, method="ptv2", layers="top:1", length=2),
    ]
    for job in jobs[:2]:
        with torch.no_grad():
            for linear in job.prompt.token_gates:
                linear.weight.normal_(0, 0.5)
    input_ids, mask = padded_batch()
    batch = {"input_ids": input_ids, "attention_mask": mask}
    packed = packed_hidden(encoder, jobs, batch)
    for job, hidden in zip(jobs, packed, strict=True):
        alone = injection.run_encoder(encoder, job.prompt(3), input_ids=input_ids, attention_mask=mask)
        assert (hidden - alone)[mask.bool()].abs().max().item() <= 1e-5
    # each job's gates get gradients from its own block only
    probe = torch.randn(packed[0].shape, generator=torch.Generator().manual_seed(0))  # LayerNorm-proof loss
    (packed[0] * probe).sum().backward()
    assert (jobs[0].prompt.layer_gates.grad.abs() > 1e-6).all()
    assert not jobs[1].prompt.layer_gates.grad.any() and not jobs[1].prompt.token_gates[0].weight.grad.any()


def test_serving_mixes_apt_ptv2_and_per_layer_lengths_in_one_batch():
    """Rows of an APT prompt (per-layer lengths, gates of its own), a second APT prompt and a ptv2 prompt in one
    forward: each row equals its own model alone."""
    from ptv2.serving import PromptServer

    _, encoder = tiny_encoder("bert")
    models = {
        "a": model_for(encoder, seed=7, head="a", length=[2, 5, 1]),
        "b": model_for(encoder, seed=8, head="b", length=3, layers=[0, 2]),
        "c": model_for(encoder, seed=9, head="c", method="ptv2", length=[4, 1, 2]),
    }
    for name in "ab":
        with torch.no_grad():
            for linear in models[name].prompt.token_gates:
                linear.weight.normal_(0, 0.5)
    server = PromptServer(encoder, None, models, {}).eval()
    input_ids, mask = padded_batch(lengths=(9, 6, 4, 8, 3, 7))
    tasks = ["a", "b", "c", "a", "c", "b"]
    with torch.no_grad():
        mixed = server({"input_ids": input_ids, "attention_mask": mask}, tasks=tasks)
        for name, model in models.items():
            rows = [i for i, t in enumerate(tasks) if t == name]
            alone = model({"input_ids": input_ids[rows], "attention_mask": mask[rows]}, head=name)
            torch.testing.assert_close(torch.stack([mixed[r] for r in rows]), alone, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ the command line
def test_train_eval_predict_apt_with_per_layer_lengths(tmp_path):
    """`ptv2 train prompt=apt prompt.length=[2,5]` on the 2-layer tiny BERT: the trainable count is the prefix rows,
    the gates and the head; `ptv2 eval` reproduces the best epoch from the checkpoint; `ptv2 predict` writes."""
    import json

    from conftest import SMOKE, evaluate_and_predict, ptv2

    run = tmp_path / "run"
    ptv2(
        "train",
        *SMOKE,
        "logger=none",
        "prompt=apt",
        "prompt.length=[2,5]",
        "trainer.limit_eval=null",
        f"hydra.run.dir={run}",
    )
    results = json.loads((run / "results.json").read_text())
    rows, hidden, layers, labels = 2 + 5, 32, 2, 2
    assert results["method"] == "apt"
    assert results["trainable_params"] == rows * 2 * hidden + rows * (hidden + 1) + layers + hidden * labels + labels
    evaluate_and_predict(run, tmp_path)


def test_refusals_name_the_fix(tmp_path):
    from conftest import SMOKE, ptv2

    cases = {
        ("prompt.length=[2,5,3]",): "3 lengths for the 2 layers",
        ("prompt=prompt_tuning", "prompt.length=[2,5]"): "only deep prompts take",
        ("prompt.length=[2,0]",): "every per-layer length must be",
        ("prompt.length=[2,5]", "prompt.shift_positions=true"): "set prompt.shift_positions=false",
    }
    for args, message in cases.items():
        result = ptv2("train", *SMOKE, "logger=none", *args, f"hydra.run.dir={tmp_path / 'x'}", check=False)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-500:])


def test_packed_apt_sweep_equals_the_jobs_run_separately(tmp_path):
    """prompt=apt with one length and with per-layer lengths x two learning rates: four jobs in one packed group
    (one backbone forward of 4 x B rows) end as the four jobs run separately (tolerances as tests/test_packed.py)."""
    import json

    from conftest import RTE, ptv2

    run = [f"task.data_dir={RTE}", "logger=none", "trainer.epochs=2", "trainer.batch_size=4", "trainer.progress=false"]
    grid = ["backbone=tiny", "prompt=apt", "prompt.length=2,[1,3]", "optimizer.lr=1e-2,3e-2"]
    grid += ["backbone.dropout=0", "backbone.attention_dropout=0", "prompt.dropout=0", "task.head_dropout=0"]
    folders = {"separate": [], "packed": ["hydra/launcher=packed", "hydra.launcher.jobs_per_forward=4"]}
    results = {}
    for name, extra in folders.items():
        ptv2("train", "-m", *run, *grid, *extra, f"hydra.sweep.dir={tmp_path / name}")
        results[name] = {
            p.name: json.loads((p / "results.json").read_text()) for p in (tmp_path / name).iterdir() if p.is_dir()
        }
    assert "packed group of 4" in (tmp_path / "packed" / "0" / "train.log").read_text()
    assert results["packed"].keys() == results["separate"].keys() and len(results["packed"]) == 4
    for job, ours in results["packed"].items():
        theirs = results["separate"][job]
        assert ours["trainable_params"] == theirs["trainable_params"]
        for x, y in zip(ours["history"], theirs["history"], strict=True):
            assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-6)
            assert x["dev/accuracy"] == y["dev/accuracy"]
    # `ptv2 table` keeps per-layer lengths as rows of their own (and off the length plot's numeric axis)
    from ptv2.commands import table

    assert table.main([str(tmp_path / "packed"), "--out", str(tmp_path / "table")]) == 0
    assert any("[1, 3]" in row for row in markdown_rows((tmp_path / "table" / "table.md").read_text()))


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
def test_gradient_checkpointing_recomputes_the_gates(family):
    """Checkpointed layers rerun the pre-attention hook in the backward: the same output and the same gate
    gradients as without checkpointing."""
    _, encoder = tiny_encoder(family)
    model = model_for(encoder).train()
    for module in model.modules():  # deterministic training-mode forward
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = dict(zip(("input_ids", "attention_mask"), padded_batch(pad_id=pad_for(family)), strict=True))
    probe = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (False, True):
        if checkpointed:
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        (model(batch) * probe).sum().backward()
        grads.append(torch.cat([model.prompt.layer_gates.grad, model.prompt.token_gates[0].weight.grad.flatten()]))
    assert grads[0].abs().sum() > 0 and (grads[0] - grads[1]).abs().max().item() <= 1e-6


def test_a_decoder_trains_apt_on_rte_and_tagging_and_refuses_generation(tmp_path):
    from conftest import ptv2
    from test_decoders import TASKS, decoder_overrides, train_run

    for task in ("rte", "conll03"):
        args = [*decoder_overrides("llama"), "prompt=apt", "prompt.length=4", *TASKS[task]]
        results = train_run(args, tmp_path / task)
        assert results["method"] == "apt" and results["steps"] >= 1
    refused = ptv2("train", *decoder_overrides("llama"), "prompt=apt", *TASKS["generation"], check=False)
    assert refused.returncode != 0 and "use prompt.method=ptv2" in refused.stderr

"""PTP (prompt.method=ptp): P-Tuning v2's deep prompt trained with a perturbation-based regularizer.

The objective's loss and the parameter gradients it gives equal a reference written here from the formulas
(src/ptv2/modeling/methods/ptp/objective.py's docstring): the same noise drawn from the same seed, the encoder run on
inputs_embeds built by hand, the adversarial ascent done row by row. No perturbation gives (1 + lambda) x the plain
loss; evaluation never perturbs and draws nothing; the inference forward is P-Tuning v2's.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, assert_only_prompt_and_head_get_gradients, padded_batch
from omegaconf import OmegaConf
from transformers import AutoModel, BertConfig

from ptv2.modeling import injection
from ptv2.modeling.heads import ClassificationHead
from ptv2.modeling.model import PromptModel

_SOURCE = Path(injection.__file__).parent / "methods" / "ptp" / "objective.py"
_spec = importlib.util.spec_from_file_location("ptp_objective_under_test", _SOURCE)
objective_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(objective_module)
ptp_objective = objective_module.ptp_objective

TOLERANCE = 1e-6
LABELS = torch.tensor([0, 2, 1])
# large perturbations: a random tiny encoder's loss moves visibly
SETTINGS = dict(perturbed_weight=0.7, noise_std=0.5, adv_steps=3, adv_step_size=0.3, adv_init=1.0, adv_bound=2.0)
RN = {**SETTINGS, "perturbation": "rn"}
ADV = {**SETTINGS, "perturbation": "adv"}


def settings(**values) -> SimpleNamespace:
    return SimpleNamespace(**values)


def tiny_bert(dropout: float = 0.0):
    """A prompt-ready random tiny BERT (3 layers, hidden 32); dropout 0: the only random draws are the noise's."""
    config = BertConfig(**TINY, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    encoder = AutoModel.from_config(config, attn_implementation=injection.ATTENTION_KEY, add_pooling_layer=False)
    injection.prepare_encoder(encoder)
    return encoder


def ptv2_model(encoder, seed: int = 3) -> PromptModel:
    """P-Tuning v2 on every layer, prefixes large enough to move a random tiny encoder's outputs."""
    cfg = dict(method="ptv2", length=4, projection="none", projection_dim=16, dropout=0.0, layers="all")
    cfg = OmegaConf.create({**cfg, "init_std": 1.0, "shift_positions": False, "encoder": "lstm"})
    torch.manual_seed(seed)
    return PromptModel(encoder, cfg, {"t": (ClassificationHead, 3)}, head_dropout=0.0)


def ptp_model(values: dict, dropout: float = 0.0) -> PromptModel:
    model = ptv2_model(tiny_bert(dropout))
    model.objective = ptp_objective(settings(**values))
    return model.train()


def make_batch() -> dict:
    input_ids, mask = padded_batch()
    return {"input_ids": input_ids, "attention_mask": mask, "labels": LABELS}


# ---- the reference: the formulas, written out on inputs_embeds ----


def reference_loss(model: PromptModel, batch: dict, delta: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of the [CLS] logits of the prompted encoder run on E(x) + delta."""
    embeds = model.encoder.embeddings.word_embeddings(batch["input_ids"])
    if delta is not None:
        embeds = embeds + delta
    prefix = model.prompt(embeds.shape[0])
    hidden = injection.run_encoder(model.encoder, prefix, inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    linear = model.heads["t"].linear
    logits = hidden[:, 0] @ linear.weight.T + linear.bias
    return F.cross_entropy(logits, batch["labels"])


def row_norm(tensor: torch.Tensor, row: int) -> float:
    return math.sqrt(float((tensor[row] ** 2).sum()))


def reference_rn(model, batch, values, seed):
    real = batch["attention_mask"].float().unsqueeze(-1)
    torch.manual_seed(seed)
    noise = torch.randn(*batch["input_ids"].shape, model.encoder.config.hidden_size)
    clean = reference_loss(model, batch, None)
    return clean + values["perturbed_weight"] * reference_loss(model, batch, values["noise_std"] * noise * real)


def reference_adv(model, batch, values, seed, losses: list | None = None):
    """delta_0 = P(m u init / sqrt(n e)); K losses at delta_t; delta_{t+1} = P(delta_t + alpha g / ||g||)."""
    rows, width = batch["input_ids"].shape
    hidden_size = model.encoder.config.hidden_size
    real = batch["attention_mask"].float().unsqueeze(-1)
    eps, alpha, steps = values["adv_bound"], values["adv_step_size"], values["adv_steps"]

    def project(delta):
        rows_out = []
        for row in range(rows):
            norm = row_norm(delta, row)
            rows_out.append(delta[row] * (eps / norm if norm > eps else 1.0))
        return torch.stack(rows_out)

    torch.manual_seed(seed)
    uniform = torch.empty(rows, width, hidden_size).uniform_(-1.0, 1.0)
    tokens = batch["attention_mask"].sum(dim=1).tolist()
    scale = torch.tensor([values["adv_init"] / math.sqrt(n * hidden_size) for n in tokens]).view(-1, 1, 1)
    delta = project(uniform * real * scale)
    clean = reference_loss(model, batch, None)
    perturbed = []
    for step in range(steps):
        delta = delta.detach().requires_grad_(True)
        perturbed.append(reference_loss(model, batch, delta))
        if step < steps - 1:
            (grad,) = torch.autograd.grad(perturbed[-1], delta, retain_graph=True)
            grad = grad * real
            unit = torch.stack([grad[row] / row_norm(grad, row) for row in range(rows)])
            delta = project(delta.detach() + alpha * unit)
    if losses is not None:
        losses.extend(loss.item() for loss in perturbed)
    return clean + values["perturbed_weight"] * sum(perturbed) / steps


def gradients(model: PromptModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, model: PromptModel) -> None:
    assert abs(ours.item() - theirs.item()) <= TOLERANCE, (ours.item(), theirs.item())
    mine, reference = gradients(model, ours), gradients(model, theirs)
    assert mine.keys() == reference.keys() and mine
    for name in mine:
        gap = (mine[name] - reference[name]).abs().max().item()
        assert gap <= TOLERANCE, (name, gap)


# ---- tests ----


@pytest.mark.parametrize("steps", [1, 3])
def test_adversarial_loss_and_gradients_equal_the_reference(steps):
    values = {**ADV, "adv_steps": steps}
    model, batch = ptp_model(values), make_batch()
    torch.manual_seed(11)
    ours = model(batch, loss=True)  # training: PromptModel hands the loss to the objective
    assert all(p.grad is None for p in model.parameters())  # the ascent used autograd.grad, not .grad
    theirs = reference_adv(model, batch, values, seed=11)
    assert_same(ours, theirs, model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    model(batch, loss=True).backward()
    assert_only_prompt_and_head_get_gradients(model)


def test_adversarial_bound_binds_and_the_ascent_climbs():
    # a bound smaller than the steps: the projection decides every delta after the first
    values = {**ADV, "adv_steps": 4, "adv_bound": 0.4, "adv_step_size": 0.3}
    model, batch = ptp_model(values), make_batch()
    torch.manual_seed(5)
    ours = model(batch, loss=True)
    assert_same(ours, reference_adv(model, batch, values, seed=5), model)
    # small steps up the gradient raise the loss at every step (first order)
    losses: list[float] = []
    reference_adv(ptp_model(values), batch, {**values, "adv_step_size": 0.01, "adv_bound": 10.0}, 5, losses)
    assert all(later > earlier for earlier, later in zip(losses, losses[1:], strict=False)), losses


def test_random_noise_loss_and_gradients_equal_the_reference():
    model, batch = ptp_model(RN), make_batch()
    torch.manual_seed(7)
    ours = model(batch, loss=True)
    assert_same(ours, reference_rn(model, batch, RN, seed=7), model)
    with torch.no_grad():  # and the noise moves the loss
        torch.manual_seed(7)
        plain = (1 + RN["perturbed_weight"]) * reference_loss(model, batch, None)
        assert abs(model(batch, loss=True).item() - plain.item()) > 1e-3


@pytest.mark.parametrize("values", [RN, ADV], ids=["rn", "adv"])
def test_same_draws_with_dropout_on(values):
    """With dropout the noise is drawn first, then the clean forward, then the perturbed ones, each drawing its
    dropout masks in turn: the reference that draws in that order gives the same loss and gradients."""
    model, batch = ptp_model(values, dropout=0.2), make_batch()
    reference = reference_rn if values["perturbation"] == "rn" else reference_adv
    torch.manual_seed(9)
    ours = model(batch, loss=True)
    assert_same(ours, reference(model, batch, values, seed=9), model)


@pytest.mark.parametrize(
    "values",
    [
        {**RN, "noise_std": 0.0},
        {**ADV, "adv_bound": 0.0},  # eps = 0: every delta is projected to 0, whatever the start and the steps
        {**ADV, "adv_init": 0.0, "adv_step_size": 0.0},
    ],
    ids=["rn-sigma0", "adv-eps0", "adv-no-steps"],
)
def test_no_perturbation_is_the_plain_loss_weighted(values):
    model, batch = ptp_model(values), make_batch()
    torch.manual_seed(2)
    ours = model(batch, loss=True)
    plain = model.head_for("t").loss(model(batch), batch)
    assert abs(ours.item() - (1 + values["perturbed_weight"]) * plain.item()) <= TOLERANCE
    mine = gradients(model, ours)
    scaled = gradients(model, (1 + values["perturbed_weight"]) * model.head_for("t").loss(model(batch), batch))
    for name in mine:
        assert (mine[name] - scaled[name]).abs().max().item() <= TOLERANCE, name


@pytest.mark.parametrize("values", [RN, ADV], ids=["rn", "adv"])
def test_evaluation_never_perturbs_and_inference_is_ptv2(values):
    model, batch = ptp_model(values), make_batch()
    twin = ptv2_model(tiny_bert())  # same seeds: the same prefix and head, no objective
    twin.load_state_dict(model.state_dict())
    model.eval(), twin.eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        loss, twin_loss = model(batch, loss=True), twin(batch, loss=True)
        logits, twin_logits = model(batch), twin(batch)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
    assert torch.equal(loss, twin_loss) and torch.equal(logits, twin_logits)


def test_settings_out_of_range_are_refused():
    for bad in ({**RN, "perturbation": "gaussian"}, {**RN, "noise_std": -1.0}, {**ADV, "adv_steps": 0}):
        with pytest.raises(ValueError):
            ptp_objective(settings(**bad))


def test_a_frozen_cache_batch_is_refused():
    model, batch = ptp_model(RN), make_batch()
    with pytest.raises(RuntimeError, match="cache_frozen"):
        model({**batch, "frozen_hidden": {1: torch.zeros(3, 9, 32)}}, loss=True)

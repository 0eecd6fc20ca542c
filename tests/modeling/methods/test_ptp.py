"""PTP (prompt.method=ptp): P-Tuning v2's deep prompt trained with a perturbation-based regularizer.

The objective's loss and the parameter gradients it gives equal a reference written here from the formulas
(src/ptv2/modeling/methods/ptp/objective.py's docstring): the same noise drawn from the same seed, the encoder run on
inputs_embeds built by hand, the adversarial ascent done row by row. No perturbation gives (1 + lambda) x the plain
loss; evaluation never perturbs and draws nothing; the inference forward and the checkpoint are P-Tuning v2's; the
command line trains, evaluates, predicts and tabulates a PTP run on the tiny BERT.
"""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, assert_only_prompt_and_head_get_gradients, padded_batch
from omegaconf import OmegaConf
from transformers import AutoModel, BertConfig

from ptv2.modeling import injection
from ptv2.modeling.heads import ClassificationHead
from ptv2.modeling.methods import METHODS, method
from ptv2.modeling.methods.ptp.objective import ptp_objective
from ptv2.modeling.model import PromptModel
from ptv2.modeling.prompts import PrefixEncoder

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


def prompt_settings(name: str, **values):
    """prompt=NAME's settings: a prefix of 4 on every layer, no dropout, vectors large enough to move the outputs of
    a random tiny encoder."""
    base = dict(method=name, length=4, projection="none", dropout=0.0, layers="all", init_std=1.0)
    return OmegaConf.structured(METHODS[name].settings(**base, **values))


def build(encoder, name: str, values: dict | None = None, seed: int = 3) -> PromptModel:
    torch.manual_seed(seed)
    return PromptModel(encoder, prompt_settings(name, **(values or {})), {"t": (ClassificationHead, 3)}, 0.0)


def ptp_model(values: dict, dropout: float = 0.0) -> PromptModel:
    """prompt=ptp through the registry (its objective included), in training mode."""
    return build(tiny_bert(dropout), "ptp", values).train()


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
    assert type(model.prompt) is PrefixEncoder  # P-Tuning v2's prefix, nothing of PTP's in the checkpoint
    twin = build(tiny_bert(), "ptv2")  # no objective
    assert twin.objective is None
    twin.load_state_dict(model.state_dict())
    assert model.prompt_state_dict().keys() == twin.prompt_state_dict().keys()
    model.eval(), twin.eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        loss, twin_loss = model(batch, loss=True), twin(batch, loss=True)
        logits, twin_logits = model(batch), twin(batch)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
    assert torch.equal(loss, twin_loss) and torch.equal(logits, twin_logits)


def test_registry_entry_mixes_at_inference_and_refuses_packing():
    row = method("ptp")
    assert row.prompt == "prefix" and row.mixes_in_batch and row.exports == "prefix" and row.objective is not None
    assert not row.packs and "shared forward" in row.pack_refusal
    settings_fields = set(METHODS["ptp"].settings.__dataclass_fields__)
    assert set(METHODS["ptv2"].settings.__dataclass_fields__) < settings_fields  # P-Tuning v2's, and PTP's own
    assert {"perturbation", "noise_std", "adv_steps", "adv_step_size", "adv_init", "adv_bound"} < settings_fields


def test_settings_out_of_range_are_refused():
    for bad in ({**RN, "perturbation": "gaussian"}, {**RN, "noise_std": -1.0}, {**ADV, "adv_steps": 0}):
        with pytest.raises(ValueError):
            ptp_objective(settings(**bad))


def test_frozen_cache_states_are_not_used():
    """Hidden states cached from unperturbed embeddings would skip the perturbation: the objective runs the whole
    encoder (the batch's cached states, garbage here, change nothing)."""
    model, batch = ptp_model(RN), make_batch()
    torch.manual_seed(4)
    alone = model(batch, loss=True).item()
    torch.manual_seed(4)
    cached = model({**batch, "frozen_hidden": {1: torch.full((3, 9, 32), 7.0)}}, loss=True).item()
    assert cached == alone


# ------------------------------------------------------------------------------------------------ the command line
@pytest.mark.parametrize("perturbation", ["rn", "adv"])
def test_train_eval_predict_and_table_list_ptp(tmp_path, perturbation):
    """`ptv2 train prompt=ptp` on the tiny BERT and the RTE fixture: P-Tuning v2's trainable parameters, `ptv2 eval`
    reproduces the best epoch from the checkpoint, `ptv2 predict` writes (alone and mixed with another prompt on one
    backbone), `ptv2 table` lists the run as ptp."""
    from conftest import RTE, SMOKE, ptv2

    from ptv2.commands import table

    run = tmp_path / "runs" / "ptp"
    extra = ["prompt.adv_steps=2"] if perturbation == "adv" else []
    ptv2(
        "train",
        *SMOKE,
        "logger=none",
        "prompt=ptp",
        f"prompt.perturbation={perturbation}",
        *extra,
        "trainer.limit_eval=null",
        f"hydra.run.dir={run}",
    )
    results = json.loads((run / "results.json").read_text())
    prefix, hidden, layers, labels = 16, 32, 2, 2
    assert results["method"] == "ptp"
    assert results["trainable_params"] == prefix * layers * 2 * hidden + hidden * labels + labels
    assert all(math.isfinite(epoch["train_loss"]) for epoch in results["history"])
    evaluated = tmp_path / "eval"
    ptv2("eval", f"ckpt={run}", f"task.data_dir={RTE}", f"hydra.run.dir={evaluated}")
    assert json.loads((evaluated / "eval.json").read_text())["metrics"]["accuracy"] == results["best"]["accuracy"]
    out = tmp_path / "predict"
    ptv2("predict", f"ckpt={run}", "split=test", f"task.data_dir={RTE}", f"output_dir={out}", f"hydra.run.dir={out}")
    alone = (out / "RTE.jsonl").read_text()
    # at inference a PTP checkpoint mixes in a batch as a ptv2 one does: twice on one backbone, the same answers
    mixed = tmp_path / "mixed"
    ptv2(
        "predict",
        f"ckpt=[{run},{run}]",
        "split=test",
        f"task.data_dir={RTE}",
        f"output_dir={mixed}",
        f"hydra.run.dir={mixed}",
    )
    assert [(mixed / name / "RTE.jsonl").read_text() for name in ("rte", "rte-1")] == [alone, alone]
    assert table.main([str(tmp_path / "runs"), "--out", str(tmp_path / "table")]) == 0
    assert "ptp" in (tmp_path / "table" / "table.md").read_text()


def test_a_killed_ptp_run_resumes_to_the_uninterrupted_run(tmp_path):
    """The noise comes from torch's global generator, which a resumed run restores: killed mid-epoch (SIGKILL after
    step 9 of 18, dropout on) and resumed, a PTP-ADV run ends as the uninterrupted one, bit for bit."""
    from test_resume import assert_same_run, train

    args = ["prompt=ptp", "prompt.perturbation=adv", "prompt.adv_steps=2"]
    reference, run = tmp_path / "reference", tmp_path / "killed"
    assert train(*args, f"hydra.run.dir={reference}").returncode == 0
    assert train(*args, f"hydra.run.dir={run}", die_at=9).returncode == -9
    resumed = train(*args, f"hydra.run.dir={run}", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(run, reference)


def test_a_packed_sweep_trains_ptp_jobs_one_by_one(tmp_path):
    """hydra/launcher=packed runs each PTP job alone, saying why, and each trains with PTP's loss: the same history
    as the job run by itself."""
    from conftest import SMOKE, ptv2

    common = [*SMOKE, "logger=none", "prompt=ptp", "prompt.perturbation=adv", "prompt.adv_steps=2"]
    sweep = tmp_path / "sweep"
    swept = ptv2("train", "-m", *common, "optimizer.lr=1e-2,3e-2", "hydra/launcher=packed", f"hydra.sweep.dir={sweep}")
    said = swept.stdout + swept.stderr + "".join((sweep / job / "train.log").read_text() for job in ("0", "1"))
    assert said.count(f"runs alone: prompt.method=ptp {method('ptp').pack_refusal}") == 2
    assert "packed group of" not in said
    single = tmp_path / "single"
    ptv2("train", *common, "optimizer.lr=1e-2", f"hydra.run.dir={single}")
    ours, theirs = (json.loads((folder / "results.json").read_text())["history"] for folder in (sweep / "0", single))
    assert [epoch["train_loss"] for epoch in ours] == [epoch["train_loss"] for epoch in theirs]


def test_a_ptp_prefix_exports_to_peft_and_imports_back_bit_for_bit(tmp_path):
    """`ptv2 export --to peft` writes a PTP run as the P-Tuning v2 prefix it is; imported back, the same tensors."""
    from conftest import TINY_BERT, ptv2
    from safetensors.torch import load_file
    from test_peft_export import RTE as RTE_TASK
    from test_peft_export import export, train_tiny
    from transformers import AutoConfig

    saved_tiny_bert = tmp_path / "tiny-bert-weights"  # the packaged tiny BERT with saved random weights
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(TINY_BERT)).save_pretrained(saved_tiny_bert)
    for file in TINY_BERT.iterdir():
        if file.name != "config.json":
            shutil.copy(file, saved_tiny_bert / file.name)

    run = train_tiny(saved_tiny_bert, tmp_path / "run", RTE_TASK, "prompt=ptp")
    out, back = tmp_path / "adapter", tmp_path / "back"
    export(run, out, saved_tiny_bert)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    ptv2("import", str(out), "--from", "peft", str(back), "--like", str(run), "--backbone", str(saved_tiny_bert))
    original, imported = (load_file(str(folder / "prompt.safetensors")) for folder in (run, back))
    assert imported.keys() == original.keys()
    assert all(torch.equal(imported[key], original[key]) for key in imported)

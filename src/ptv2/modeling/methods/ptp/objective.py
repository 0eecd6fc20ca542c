"""PTP's training loss (Chen et al., "PTP: Boosting Stability and Performance of Prompt Tuning with Perturbation-Based
Regularizer", EMNLP 2023, arXiv 2305.02423): P-Tuning v2's deep prompt, trained on clean AND perturbed inputs.

The perturbation delta (B, L, e) is added to the input tokens' word embeddings E(x) (e: the embedding width), only on
real tokens (m = attention_mask, (B, L, 1)); the prompt itself is never perturbed. With L(delta) the head's loss of the
model run on E(x) + delta (L(0): the plain P-Tuning v2 loss):

    loss = L(0) + lambda * R                                   lambda = perturbed_weight

PTP-RN (perturbation=rn), one Gaussian draw per step:

    R = L(delta),   delta = sigma * m (.) z,   z ~ N(0, I)     sigma = noise_std

PTP-ADV (perturbation=adv), FreeLB-style K-step ascent (Zhu et al., ICLR 2020), per example b, ||.|| the Frobenius
norm over the example's (L, e) entries, n_b its real tokens, P the projection onto ||delta_b|| <= eps:

    delta_0     = P(m (.) u * init / sqrt(n_b * e)),            u ~ U(-1, 1)             init = adv_init
    L_t         = L(delta_t),                                   t = 0 .. K-1             K = adv_steps
    g_t         = m (.) dL_t / d delta_t
    delta_{t+1} = P(delta_t + alpha * g_t / ||g_t||)                                     alpha = adv_step_size
    R           = (1/K) sum_t L_t                                                        eps = adv_bound
    P(delta)_b  = delta_b * min(1, eps / ||delta_b||)

Each delta_{t+1} is a new leaf (the ascent does not differentiate through earlier steps), and the parameters'
gradient is that of R: the mean of the K perturbed losses' gradients, which is what FreeLB accumulates into the
parameters over its K backward passes. Here the engine calls backward once on the returned loss, so the K perturbed
graphs are kept until then (K + 1 forwards' activations at once; a step costs about K + 1 forwards and backwards), and
delta's gradient is taken with torch.autograd.grad, which leaves the parameters' .grad untouched.

What was and was not checked against the paper (docs/methods.md, "PTP"): the two regularizers, the embedding space
as one place they act, and training on the clean and the perturbed inputs together come from the paper's abstract
and public summaries of it. The full text and the authors' code were not available when this was written, so
these are choices, not checked: the clean loss kept at weight 1 beside lambda * R; one Gaussian draw for RN; for ADV
the FreeLB recipe (uniform initialisation scaled by 1/sqrt(n_b * e), gradient steps normalised by their Frobenius
norm, projection onto a per-example Frobenius ball, gradients averaged over the K ascent steps); the defaults
(conf/prompt/ptp.yaml). The paper's text-space variants (masking words, text attacks) are not implemented.

All randomness comes from torch's global generator (the run seeds it; a resumed run replays it): the noise is drawn
before any forward, then each forward's dropout draws as it would. eps = 0 or sigma = 0 gives delta = 0, so the loss is
(1 + lambda) times P-Tuning v2's. The objective runs only while the model trains (PromptModel.forward); evaluation,
prediction and serving run P-Tuning v2's forward unchanged. A batch's frozen-cache states (trainer.cache_frozen) hold
unperturbed embeddings' hidden states, so the objective drops them and runs the whole encoder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

PERTURBATIONS = ("rn", "adv")
TINY = 1e-12  # a zero gradient or a zero perturbation is not divided by


def ptp_objective(settings: Any) -> Callable:
    """objective(model, batch, head) -> loss (a scalar tensor) for PromptModel.forward, from `settings`: an object
    with perturbation (rn | adv), perturbed_weight, noise_std (rn), adv_steps, adv_step_size, adv_init, adv_bound
    (adv). ValueError for a setting out of range (the config check refuses them first, in one line)."""
    perturbation = str(settings.perturbation)
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation={perturbation}: choose one of {', '.join(PERTURBATIONS)}")
    weight = float(settings.perturbed_weight)
    if perturbation == "rn":
        start = functools.partial(_gaussian, _at_least("noise_std", settings.noise_std, 0.0))
        perturbed_loss = _loss
    else:
        bound = _at_least("adv_bound", settings.adv_bound, 0.0)
        start = functools.partial(_adversarial_start, init=_at_least("adv_init", settings.adv_init, 0.0), bound=bound)
        perturbed_loss = functools.partial(
            _adversarial,
            steps=int(_at_least("adv_steps", settings.adv_steps, 1)),
            step_size=_at_least("adv_step_size", settings.adv_step_size, 0.0),
            bound=bound,
        )

    def objective(model, batch: dict, head: str | None) -> torch.Tensor:
        if "frozen_hidden" in batch:
            # hidden states cached from unperturbed embeddings would skip the perturbation: run the whole encoder
            batch = {key: value for key, value in batch.items() if key != "frozen_hidden"}
        mask, shape = _real_tokens(model, batch)
        delta = start(mask, shape)  # drawn before any forward: the noise never depends on dropout's draws
        clean = _loss(model, batch, head, None)
        return clean + weight * perturbed_loss(model, batch, head, delta)

    return objective


def _at_least(name: str, value, low: float) -> float:
    if float(value) < low:
        raise ValueError(f"{name}={value} must be at least {low:g}")
    return float(value)


def _loss(model, batch: dict, head: str | None, delta: torch.Tensor | None) -> torch.Tensor:
    """The head's loss with delta (B, L, e) added to the input tokens' word embeddings (None: the plain forward)."""
    return model.head_for(head).loss(model(batch, head=head, perturb=delta), batch)


def _real_tokens(model, batch: dict) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The real-token mask (B, L, 1) in the word embeddings' dtype, and the perturbation's shape (B, L, e)."""
    weight = model.encoder.get_input_embeddings().weight
    mask = batch["attention_mask"].to(device=weight.device, dtype=weight.dtype).unsqueeze(-1)
    return mask, (*batch["input_ids"].shape, weight.shape[1])


def _gaussian(noise_std: float, mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """PTP-RN's delta = sigma * m (.) z, z ~ N(0, I)."""
    return noise_std * torch.randn(shape, device=mask.device, dtype=mask.dtype) * mask


def _project(delta: torch.Tensor, bound: float) -> torch.Tensor:
    """Each example's delta scaled into the Frobenius ball of radius `bound` (unchanged inside it)."""
    norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1)
    return delta * (bound / norms.clamp(min=TINY)).clamp(max=1.0)


def _adversarial_start(mask: torch.Tensor, shape: tuple[int, ...], *, init: float, bound: float) -> torch.Tensor:
    """delta_0 = P(m (.) u * init / sqrt(n_b * e)), u ~ U(-1, 1)."""
    entries = mask.flatten(1).sum(dim=1).view(-1, 1, 1) * shape[-1]  # n_b * e
    uniform = torch.empty(shape, device=mask.device, dtype=mask.dtype).uniform_(-1.0, 1.0)
    return _project(uniform * mask * (init / entries.clamp(min=1.0).sqrt()), bound)


def _adversarial(model, batch: dict, head, delta: torch.Tensor, *, steps: int, step_size: float, bound: float):
    """PTP-ADV's R = (1/K) sum_t L(delta_t) over the K ascent iterates from delta_0 = `delta` (module docstring)."""
    mask = batch["attention_mask"].to(device=delta.device, dtype=delta.dtype).unsqueeze(-1)
    total = 0.0
    for step in range(steps):
        delta.requires_grad_(True)
        loss = _loss(model, batch, head, delta)
        total = total + loss
        if step == steps - 1:
            break
        (gradient,) = torch.autograd.grad(loss, delta, retain_graph=True)  # the parameters' .grad stays as it was
        gradient = gradient * mask
        norms = gradient.flatten(1).norm(dim=1).view(-1, 1, 1).clamp(min=TINY)
        delta = _project(delta.detach() + step_size * gradient / norms, bound)
    return total / steps

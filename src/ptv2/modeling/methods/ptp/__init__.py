"""PTP (Chen et al., EMNLP 2023, arXiv 2305.02423): P-Tuning v2's deep prompt (prompts.PrefixEncoder, unchanged)
trained on clean and perturbed input embeddings: random noise (PTP-RN) or a FreeLB-style adversarial ascent
(PTP-ADV). Only the training loss changes (objective.py, with the formulas and what was and was not checked), so a
checkpoint evaluates, predicts, serves, mixes in a batch and exports as a P-Tuning v2 one does."""

from dataclasses import dataclass

from ptv2.modeling.methods.base import DeepPromptSettings, Method, prefix_encoder
from ptv2.schema import COUNT, PER_JOB, Range, tagged

AT_LEAST_ZERO = Range(0)


@dataclass
class Settings(DeepPromptSettings):
    method: str = "ptp"
    perturbation: str = tagged("rn", PER_JOB, admits=("rn", "adv"))  # rn: Gaussian noise | adv: adversarial ascent
    perturbed_weight: float = tagged(1.0, PER_JOB, admits=AT_LEAST_ZERO)  # lambda: loss = L(clean) + lambda R
    noise_std: float = tagged(0.01, PER_JOB, admits=AT_LEAST_ZERO)  # rn: sigma of the noise on each embedding entry
    adv_steps: int = tagged(3, PER_JOB, admits=COUNT)  # adv: K perturbed forwards (K - 1 ascent steps)
    adv_step_size: float = tagged(0.1, PER_JOB, admits=AT_LEAST_ZERO)  # adv: alpha, Frobenius norm of each step
    adv_init: float = tagged(0.1, PER_JOB, admits=AT_LEAST_ZERO)  # adv: scale of the uniform start delta_0
    adv_bound: float = tagged(1.0, PER_JOB, admits=AT_LEAST_ZERO)  # adv: eps, per-example Frobenius bound on delta


def _objective(settings):
    from ptv2.modeling.methods.ptp.objective import ptp_objective

    return ptp_objective(settings)


METHOD = Method(
    "ptp",
    Settings,
    prompt="prefix",
    build=prefix_encoder,
    mixes_in_batch=True,
    exports="prefix",  # the checkpoint is a P-Tuning v2 prefix
    # read as "prompt.method=ptp <reason>" when a packed sweep runs its jobs one by one
    pack_refusal=(
        "trains with forwards of its own on perturbed inputs, which a packed group's one shared forward cannot run"
    ),
    objective=_objective,
)

"""Prefix-propagation (Li et al., ACL 2023, arXiv 2305.12086): P prefix positions in the sequence, computed by every
layer like tokens, with a learned vector added to them before each layer (module.py). Half of P-Tuning v2's
parameters at the same P. The prefix takes token positions, so rows of other checkpoints never share its batch."""

from dataclasses import dataclass

from ptv2.modeling.methods.base import InputPromptSettings, Method
from ptv2.schema import COUNT, PER_JOB, PROBABILITY, tagged


@dataclass
class Settings(InputPromptSettings):
    method: str = "prefix_propagation"
    # on the batch-expanded prefix, per example: the authors' hidden_dropout_prob, 0.1 in all their scripts
    dropout: float = tagged(0.1, PER_JOB, admits=PROBABILITY)
    projection: str = tagged("none", PER_JOB, admits=("none", "mlp"))  # reparameterization: none | mlp
    projection_dim: int = tagged(512, PER_JOB, admits=COUNT)  # hidden width of the reparameterization MLP


def _build(settings, config):
    from ptv2.modeling.methods.prefix_propagation.module import PrefixPropagation

    return PrefixPropagation(
        config.num_hidden_layers,
        config.hidden_size,
        settings.length,
        dropout=settings.dropout,
        projection=settings.projection,
        projection_dim=settings.projection_dim,
    )


# prompt="input": the prefix occupies token positions (start-up checks count them, nothing is cached below it);
# mixes_in_batch stays False: rows of one batch would need the same number of prefix positions and their own
# additions at every layer, which the packer and the server do not build, so packing and serving run it alone.
METHOD = Method("prefix_propagation", Settings, prompt="input", build=_build)

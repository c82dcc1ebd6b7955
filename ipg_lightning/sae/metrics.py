"""How good an SAE is, as torchmetrics: reconstruction, sparsity, dead features, and the model's loss.

Every state is a sum, so the metrics reduce correctly over DDP ranks and batches.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class FractionOfVarianceUnexplained(Metric):
    """``sum ||z - z_hat||^2 / sum ||z - mean(z)||^2`` over all tokens seen (0 is perfect, 1 is the mean).

    Args:
        width: the activations' width ``d_in``.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, width: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("squared_error", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squares", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sums", torch.zeros(width, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, activations: torch.Tensor, reconstructions: torch.Tensor) -> None:
        """Add (tokens, d_in) activations and their reconstructions."""
        activations, reconstructions = activations.double(), reconstructions.double()
        self.squared_error += (activations - reconstructions).pow(2).sum()
        self.squares += activations.pow(2).sum()
        self.sums += activations.sum(0)
        self.count += activations.shape[0]

    def compute(self) -> torch.Tensor:
        """The fraction of the activations' variance around their mean that the SAE leaves unexplained."""
        variance = self.squares - self.sums.pow(2).sum() / self.count.clamp(min=1)
        return (self.squared_error / variance.clamp(min=1e-12)).float()


class DeadFeatureFraction(Metric):
    """The share of features that never fired on any token seen.

    Args:
        num_features: the SAE's ``d_sae``.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("fired", torch.zeros(num_features), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor) -> None:
        """Add (tokens, d_sae) feature activations."""
        self.fired += (features != 0).sum(0).float()

    def compute(self) -> torch.Tensor:
        """Fraction of features with no activation at all."""
        return (self.fired == 0).float().mean()


def loss_recovered(metrics: dict[str, float], hook_name: str, measured_on: str) -> tuple[float | None, list[str]]:
    """``1 - loss_increase / ablation_loss_increase`` (rounded), and the warnings that go with it.

    It is 1 when splicing the SAE in costs nothing, 0 when it is as bad as replacing the activation by
    its mean. Where the mean costs nothing either (a model never trained to predict these tokens, such
    as the tiny reasoner on its prompts), the loss says nothing about the SAE: it is None, with a warning.

    >>> loss_recovered({"loss_increase": 0.1, "ablation_loss_increase": 0.5}, "blocks.2.hook_resid_post", "prompts")
    (0.8, [])
    """
    ablation = metrics.get("ablation_loss_increase")
    if ablation is not None and ablation > 0:
        return round(1 - metrics["loss_increase"] / ablation, 5), []
    advice = "; train with traces to measure on the model's own completions" if measured_on == "prompts" else ""
    return None, [
        f"Replacing {hook_name} by its mean does not raise the model's loss on the measured tokens ({measured_on}), "
        f"so loss_increase says nothing about this SAE{advice}"
    ]

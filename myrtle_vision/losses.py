"""Training losses: cross entropy weighted per class, and the DeiT distillation loss (Touvron et al., 2020).

The class head learns from the labels and the distillation head from the teacher::

    loss = alpha * CE(class_logits, labels) + (1 - alpha) * distillation term

``alpha`` weights the **label** term, as in the earlier release (the users' configs use 0.5, an
even mix). DeiT's own code weights the other way round: its ``alpha`` is our ``1 - alpha``.

- ``soft``: ``T^2 * KL(softmax(teacher / T) || softmax(dist / T))``, averaged over the batch.
  The ``T^2`` keeps the gradient's size independent of the temperature (Hinton et al., 2015).
- ``hard``: ``CE(dist_logits, argmax(teacher))``: the teacher's decision taken as a label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightedCrossEntropy(nn.Module):
    """Cross entropy with a weight per class (``train_config.class_weights``), averaged over the images:
    ``sum_i weight[y_i] * CE_i / batch size`` (with label smoothing, torch's per-image weighted loss).

    torch's ``CrossEntropyLoss(weight=...)`` divides by the sum of the batch's weights instead. The
    trainer weights each micro-batch's loss by its share of the update's images, so that accumulated
    micro-batches (and processes) give the gradient of the whole update; a per-batch division by the
    weights would make each micro-batch count by which classes it happens to hold, and a micro-batch
    of classes weighted 0 alone would give 0 / 0 = NaN. Averaging over the images keeps both right.
    """

    def __init__(self, weight: torch.Tensor, label_smoothing: float = 0.0):
        super().__init__()
        self.per_image = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing, reduction="none")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.per_image(logits, targets).mean()


class DistillationLoss(nn.Module):
    def __init__(
        self, base_criterion: nn.Module, distillation_type: str = "soft", alpha: float = 0.5, temperature: float = 3.0
    ):
        super().__init__()
        if distillation_type not in ("soft", "hard"):
            raise ValueError(f"distillation_type must be 'soft' or 'hard', not {distillation_type!r}")
        self.base_criterion = base_criterion
        self.distillation_type, self.alpha, self.temperature = distillation_type, alpha, temperature

    def distillation_term(self, dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        teacher_logits = teacher_logits.detach()
        if self.distillation_type == "hard":
            return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
        T = self.temperature
        return F.kl_div(
            F.log_softmax(dist_logits / T, dim=1),
            F.log_softmax(teacher_logits / T, dim=1),
            reduction="batchmean",
            log_target=True,
        ) * (T * T)

    def forward(
        self, class_logits: torch.Tensor, dist_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        base = self.base_criterion(class_logits, targets)
        return self.alpha * base + (1 - self.alpha) * self.distillation_term(dist_logits, teacher_logits)

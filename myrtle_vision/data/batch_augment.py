"""What happens to a whole training batch on its device, after the per-image transforms: DeiT's random
erasing (on normalized images), then MixUp or CutMix with the soft targets they make.

timm and DeiT do the same in the same order: random erasing is the last per-image transform (after
Normalize, filling the erased box with normal noise, timm's ``mode="pixel"``), and MixUp/CutMix mix
the batch in the training loop. Here each image's erasing box is drawn with torchvision's own
``RandomErasing.make_params``, the mixing with torchvision's ``MixUp``/``CutMix`` (CutMix's weight is
the area actually pasted), and the erasing of a whole batch is one masked select on the device.

Every draw comes from torch's global generator, which the trainer seeds from (seed, update,
micro-batch, rank) just before: a batch's augmentation is a function of where it is in the run, so
a resumed run draws exactly what an uninterrupted one drew.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


class BatchAugment:
    """Random erasing with probability ``erase_prob`` per image; then, with probability ``mix_prob`` per
    batch, CutMix (probability ``switch_prob``, when both are on) or MixUp. ``mixup``/``cutmix`` are the
    Beta distributions' alphas (0: off). With either on, the targets come back as class probabilities
    (one-hot for a batch left unmixed), which ``nn.CrossEntropyLoss`` takes as they are."""

    def __init__(
        self,
        num_classes: int,
        *,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        switch_prob: float = 0.5,
        mix_prob: float = 1.0,
        erase_prob: float = 0.0,
    ):
        self.num_classes, self.switch_prob, self.mix_prob = num_classes, switch_prob, mix_prob
        self.mixup = v2.MixUp(alpha=mixup, num_classes=num_classes) if mixup > 0 else None
        self.cutmix = v2.CutMix(alpha=cutmix, num_classes=num_classes) if cutmix > 0 else None
        # timm's defaults, which are torchvision's: 2% to 1/3 of the image, aspect ratio 0.3 to 3.3
        self.eraser = v2.RandomErasing(p=erase_prob, value=0) if erase_prob > 0 else None

    @classmethod
    def from_config(cls, tc, num_classes: int) -> BatchAugment:
        return cls(
            num_classes,
            mixup=tc.mixup,
            cutmix=tc.cutmix,
            switch_prob=tc.mixup_switch_prob,
            mix_prob=tc.mixup_prob,
            erase_prob=tc.random_erasing,
        )

    @property
    def enabled(self) -> bool:
        return self.mixes or self.eraser is not None

    @property
    def mixes(self) -> bool:
        return self.mixup is not None or self.cutmix is not None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.eraser is not None:
            images = self.erase(images)
        if not self.mixes:
            return images, targets
        mix = self._pick()
        if mix is None:
            return images, F.one_hot(targets, self.num_classes).float()
        return mix(images, targets)

    def _pick(self):
        """The transform that mixes this batch, or None (drawn in timm's order: apply?, then which)."""
        if self.mix_prob < 1 and torch.rand(1).item() >= self.mix_prob:
            return None
        if self.mixup is None or self.cutmix is None:
            return self.mixup or self.cutmix
        return self.cutmix if torch.rand(1).item() < self.switch_prob else self.mixup

    def erase(self, images: torch.Tensor) -> torch.Tensor:
        """Each image, with probability ``erase_prob``, has one box (torchvision's draw) filled with N(0, 1)
        noise: the boxes are drawn on the host, and the whole batch is erased in one masked select."""
        B, _, H, W = images.shape
        boxes = torch.zeros(B, 4, dtype=torch.long)  # (top, left, height, width); height 0: not erased
        for b in range(B):
            if torch.rand(1).item() >= self.eraser.p:  # as torchvision's RandomErasing.forward draws
                continue
            box = self.eraser.make_params([images[b]])
            if box["v"] is not None:  # (None: no box of the drawn size fitted in 10 tries)
                boxes[b] = torch.tensor([box["i"], box["j"], box["h"], box["w"]])
        if not boxes[:, 2].any():
            return images
        boxes = boxes.to(images.device, non_blocking=True)
        top, left, height, width = (boxes[:, k, None] for k in range(4))
        rows, cols = torch.arange(H, device=images.device), torch.arange(W, device=images.device)
        in_rows = (rows >= top) & (rows < top + height)  # (B, H)
        in_cols = (cols >= left) & (cols < left + width)  # (B, W)
        mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (B, 1, H, W)
        return torch.where(mask, torch.randn_like(images), images)

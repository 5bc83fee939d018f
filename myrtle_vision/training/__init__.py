"""Training: the ViT/DeiT training job (:mod:`.trainer`) and the CNN teacher's finetuning
(:mod:`.finetune`)."""

from .trainer import MAX_SKIPPED_IN_A_ROW, Interrupted, NonFiniteLoss, Trainer, train

__all__ = ["MAX_SKIPPED_IN_A_ROW", "Interrupted", "NonFiniteLoss", "Trainer", "train"]

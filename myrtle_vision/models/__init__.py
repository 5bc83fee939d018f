"""Model construction from a config."""

from .vit import ViTArgs, VisionTransformer


def build_model(cfg) -> VisionTransformer:
    """The ViT a train config describes, for its data config's number of classes."""
    return VisionTransformer(ViTArgs.from_config(cfg.vit_config, cfg.data_config.number_of_classes))


__all__ = ["ViTArgs", "VisionTransformer", "build_model"]

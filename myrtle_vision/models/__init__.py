"""Model construction from a config."""

from .vit import ViTArgs, VisionTransformer


def build_model(cfg, distilled: bool | None = None) -> VisionTransformer:
    """The ViT a train config describes, for its data config's number of classes.

    It is a DeiT student (with a distillation token and head) when the config has a
    ``distiller_config``, unless ``distilled`` says otherwise.
    """
    if distilled is None:
        distilled = cfg.distiller_config is not None
    return VisionTransformer(ViTArgs.from_config(cfg.vit_config, cfg.data_config.number_of_classes, distilled))


__all__ = ["ViTArgs", "VisionTransformer", "build_model"]

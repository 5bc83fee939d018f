"""Model construction from a config."""

from .vit import ViTArgs, VisionTransformer


def build_model(cfg, distilled: bool | None = None, q_format: str | None = None,
                q_rounding: str | None = None) -> VisionTransformer:
    """The ViT a train config describes, for its data config's number of classes.

    It is a DeiT student (with a distillation token and head) when the config has a
    ``distiller_config``, unless ``distilled`` says otherwise. It simulates the config's
    ``q_format`` and ``q_rounding`` unless ``q_format`` / ``q_rounding`` say otherwise.
    """
    if distilled is None:
        distilled = cfg.distiller_config is not None
    args = ViTArgs.from_config(cfg.vit_config, cfg.data_config.number_of_classes, distilled, q_format, q_rounding)
    return VisionTransformer(args)


__all__ = ["ViTArgs", "VisionTransformer", "build_model"]

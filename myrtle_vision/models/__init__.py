"""Model construction from a config."""

from .vit import VisionTransformer, ViTArgs


def build_model(
    cfg,
    distilled: bool | None = None,
    q_format: str | None = None,
    q_rounding: str | None = None,
    int8_weights: str = "per_tensor",
) -> VisionTransformer:
    """The ViT a train config describes, for its data config's number of classes.

    It is a DeiT student (with a distillation token and head) when the config has a
    ``distiller_config``, unless ``distilled`` says otherwise. It simulates the format the config
    trains in (``vit_config.trained_q_format``) and ``q_rounding`` unless ``q_format`` /
    ``q_rounding`` say otherwise; ``int8_weights`` is PyTorchINT8's weight scheme.
    """
    if distilled is None:
        distilled = cfg.distiller_config is not None
    args = ViTArgs.from_config(
        cfg.vit_config,
        cfg.data_config.number_of_classes,
        distilled=distilled,
        q_format=q_format,
        q_rounding=q_rounding,
        int8_weights=int8_weights,
    )
    return VisionTransformer(args)


__all__ = ["ViTArgs", "VisionTransformer", "build_model"]

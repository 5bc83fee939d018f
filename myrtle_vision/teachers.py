"""The names a CNN teacher may have: torchvision's classification models (its registry, nothing downloaded). Here
so that the config's check of ``distiller_config.teacher_model`` and the teachers' builder
(:mod:`myrtle_vision.models.cnn`) read one list."""

from __future__ import annotations

import torchvision

from .errors import did_you_mean


def teacher_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def teacher_name_problem(name: str) -> str | None:
    """Why ``name`` is not a torchvision classification model (with the nearest name), or None."""
    names = teacher_names()
    if name in names:
        return None
    return f"{name!r} is not a torchvision classification model" + did_you_mean(name, names)

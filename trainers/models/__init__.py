"""Model code shared by training, evaluation and serving.

MODELS maps the `model` name stored in a checkpoint's config.json to (model class, config dataclass).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from trainers.models.sasrec import SASRec, SASRecConfig
from trainers.models.sr import SRConfig, SRModel

MODELS = {"sr": (SRModel, SRConfig), "sasrec": (SASRec, SASRecConfig)}


def build_model(kind: str, config: dict) -> nn.Module:
    """Build a model from its name and a dict of its config fields (unknown fields are an error)."""
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; known: {sorted(MODELS)}")
    model_cls, config_cls = MODELS[kind]
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{config_cls.__name__}: unknown fields {unknown}")
    return model_cls(config_cls(**config))


__all__ = ["MODELS", "SASRec", "SASRecConfig", "SRConfig", "SRModel", "build_model"]

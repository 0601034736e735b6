"""Model code shared by training, evaluation and serving.

MODELS maps the `model` name stored in a checkpoint's config.json to (model class, config dataclass). Every
model is a `Recommender` and its config holds a `ModelSize` as `size` (trainers/models/base.py).
"""

from __future__ import annotations

from core.config import from_dict
from trainers.models.base import ModelSize, Recommender, TextRecommender
from trainers.models.sasrec import SASRec, SASRecConfig
from trainers.models.sr import SRConfig, SRModel

MODELS = {"sr": (SRModel, SRConfig), "sasrec": (SASRec, SASRecConfig)}


def build_model(kind: str, config: dict) -> Recommender:
    """Build a model from its name and a dict of its config fields, the size nested as in `to_dict(config)`
    (a ConfigError names an unknown or bad field)."""
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; known: {sorted(MODELS)}")
    model_cls, config_cls = MODELS[kind]
    return model_cls(from_dict(config_cls, config))


__all__ = ["MODELS", "ModelSize", "Recommender", "SASRec", "SASRecConfig", "SRConfig", "SRModel",
           "TextRecommender", "build_model"]

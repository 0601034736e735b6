import math

import pytest
import torch

from trainers.losses import comment_loss, id_text_loss, in_batch_logits, video_loss
from trainers.models import ModelSize, SASRecConfig

ITEMS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])


class Stub:
    """Fixed unit vectors instead of a model (a Recommender without time features), temperature 1."""

    config = SASRecConfig(size=ModelSize(hidden=2, num_heads=1, temperature=1.0))
    temperature = 1.0

    def user_video_vector(self, batch):
        return batch["user"]

    def video_item_vectors(self, idx):
        return ITEMS[idx.clamp(min=0)]

    def comment_context_vector(self, batch, query_video):
        return batch["user"]

    def comment_item_vectors(self, idx):
        return ITEMS[idx.clamp(min=0)]

    def id_text_vectors(self, kind, idx):
        return ITEMS[idx], ITEMS[idx]


def test_in_batch_logits_mask_repeated_items():
    logits = in_batch_logits(ITEMS[:2], ITEMS[[0, 0]], torch.tensor([0, 0]), temperature=0.5)
    assert logits[0, 0] == pytest.approx(2.0)
    assert logits[0, 1] == float("-inf") and logits[1, 0] == float("-inf")


def test_video_loss_by_hand():
    batch = {"user": ITEMS[:2], "target": torch.tensor([0, 1]), "negatives": torch.tensor([[2], [-1]])}
    # Row 0 logits: target 1, other target 0, own negative 0.6. Row 1: other target 0, target 1, padding.
    row0 = -math.log(math.e / (math.e + 1 + math.exp(0.6)))
    row1 = -math.log(math.e / (math.e + 1))
    assert video_loss(Stub(), batch, train_negatives=5).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    without = -math.log(math.e / (math.e + 1))
    assert video_loss(Stub(), batch, train_negatives=0).item() == pytest.approx(without, rel=1e-6)


def test_comment_loss_by_hand():
    batch = {"user": ITEMS[:2], "query_video": torch.tensor([0, 0]), "target": torch.tensor([0, 1]),
             "negatives": torch.tensor([[1, -1], [-1, -1]])}
    # Row 0: target 1 vs negative 0; row 1 has no negatives and contributes 0.
    expected = -math.log(math.e / (math.e + 1)) / 2
    assert comment_loss(Stub(), batch).item() == pytest.approx(expected, rel=1e-6)


def test_id_text_loss_needs_two_distinct_items():
    assert id_text_loss(Stub(), torch.tensor([1, 1]), None, 1.0) is None
    loss = id_text_loss(Stub(), torch.tensor([0, 1, 1]), None, 1.0)
    # Items 0 and 1 are orthogonal: logits [[1, 0], [0, 1]] both ways.
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)

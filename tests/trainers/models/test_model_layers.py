import torch
from torch import nn

from trainers.models.layers import causal_mask, position_ids, safe_lookup


def test_positions_count_back_from_the_newest_slot():
    mask = torch.tensor([[False, True, True], [True, True, True]])
    assert position_ids(mask, max_position=5, randomize=False).tolist() == [[2, 3, 4], [2, 3, 4]]


def test_random_positions_are_sorted_distinct_and_in_range():
    torch.manual_seed(0)
    mask = torch.tensor([[False, False, True, True, True]] * 200)
    pos = position_ids(mask, max_position=50, randomize=True)
    real = pos[:, 2:]
    assert (real[:, 1:] > real[:, :-1]).all()  # strictly increasing, so distinct
    assert real.min() >= 0 and real.max() < 50
    assert (pos[:, :2] == 0).all()  # padding slots
    assert len({tuple(r) for r in real.tolist()}) > 150  # actually random


def test_causal_mask_by_hand():
    allowed = causal_mask(torch.tensor([[False, True, True]]))
    assert allowed.shape == (1, 1, 3, 3)
    # Padding slot 0 may only see itself; slot 1 sees itself; slot 2 sees slots 1 and 2.
    assert allowed[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_safe_lookup_zeroes_padding_unknown_and_unseen():
    table = nn.Embedding(3, 2)
    nn.init.constant_(table.weight, 1.0)
    seen = torch.tensor([True, False, True])
    out = safe_lookup(table, torch.tensor([0, 1, 2, -1, 7]), seen)
    assert out.tolist() == [[1, 1], [0, 0], [1, 1], [0, 0], [0, 0]]

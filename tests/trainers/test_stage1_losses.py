import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainers.losses import gather_rows, global_mean, info_nce, seq_sup_contrast, vc_contrast

A, B, C = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.6, 0.8])


def test_info_nce_by_hand():
    # Temperature 1. Row 0: logits [1, 0] -> -log(e/(e+1)); row 1: logits [0.6, 0.8] with the positive 0.8.
    loss = info_nce(torch.stack([A, C]), torch.stack([A, B]), temperature=1.0)
    row0 = -math.log(math.e / (math.e + 1))
    row1 = -math.log(math.exp(0.8) / (math.exp(0.6) + math.exp(0.8)))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_info_nce_masks_the_same_item_twice():
    # Keys 0 and 2 are the same item (id 5): for row 0, key 2 is neither positive nor negative.
    loss = info_nce(torch.stack([A, B, A]), torch.stack([A, B, A]), 0.5, ids=torch.tensor([5, 6, 5]))
    row0 = -math.log(math.exp(2) / (math.exp(2) + 1))  # logits [2, 0, masked]
    row1 = -math.log(math.exp(2) / (math.exp(2) + 2))  # logits [0, 2, 0]
    assert loss.item() == pytest.approx((2 * row0 + row1) / 3, rel=1e-6)


def test_seq_sup_contrast_is_symmetric_average():
    sr, llm = torch.stack([A, B]), torch.stack([C, B])
    # sr->llm: row 0 logits [0.6, 0] target 0.6; row 1 logits [0.8, 1] target 1.
    # llm->sr: row 0 logits [0.6, 0.8] target 0.6; row 1 logits [0, 1] target 1.
    def ce(pos, other):
        return -math.log(math.exp(pos) / (math.exp(pos) + math.exp(other)))

    forward = (ce(0.6, 0) + ce(1, 0.8)) / 2
    backward = (ce(0.6, 0.8) + ce(1, 0)) / 2
    assert seq_sup_contrast(sr, llm, 1.0).item() == pytest.approx((forward + backward) / 2, rel=1e-6)


def test_seq_sup_contrast_masks_other_examples_of_the_same_user():
    # Rows 0 and 2 are one user's: in each direction row 0's denominator loses row 2 and row 2's loses row 0.
    sr, llm = torch.stack([A, B, A]), torch.stack([A, B, C])
    def ce(pos, *others):
        return -math.log(math.exp(pos) / (math.exp(pos) + sum(math.exp(o) for o in others)))

    # sr->llm (queries sr, keys llm): row 0 [1, 0, (0.6)], row 1 [0, 1, 0.8], row 2 [(1), 0, 0.6]
    forward = (ce(1, 0) + ce(1, 0, 0.8) + ce(0.6, 0)) / 3
    # llm->sr: row 0 [1, 0, (1)], row 1 [0, 1, 0], row 2 [(0.6), 0.8, 0.6]
    backward = (ce(1, 0) + ce(1, 0, 0) + ce(0.6, 0.8)) / 3
    users = torch.tensor([7, 8, 7])
    assert seq_sup_contrast(sr, llm, 1.0, users).item() == pytest.approx((forward + backward) / 2, rel=1e-6)
    assert seq_sup_contrast(sr, llm, 1.0).item() != pytest.approx((forward + backward) / 2, rel=1e-3)


def test_vc_contrast_by_hand():
    llm = torch.stack([C, C])
    video_hist, comment_hist = torch.stack([A, A]), torch.stack([B, B])
    # Both rows: logits [0.6, 0.8]. Row 0 is a video example (answer 0.6), row 1 a comment example (0.8).
    loss = vc_contrast(llm, video_hist, comment_hist, torch.tensor([True, False]), 1.0)
    total = -math.log(math.exp(0.6) / (math.exp(0.6) + math.exp(0.8))) - math.log(
        math.exp(0.8) / (math.exp(0.6) + math.exp(0.8)))
    assert loss.item() == pytest.approx(total / 2, rel=1e-6)


def test_single_process_helpers_are_identity_and_mean():
    x = torch.randn(3, 2)
    assert gather_rows(x) is x
    assert global_mean(torch.tensor([1.0, 2.0, 6.0])).item() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        info_nce(torch.zeros(2, 2), torch.zeros(3, 2), 1.0)


# ---- 2 workers against 1 on the same global batch ------------------------------------------------------

SPLIT = [4, 3]  # unequal: the last batch of an epoch


def _global_batch():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(sum(SPLIT), 8, generator=g), dim=-1)
    k = F.normalize(torch.randn(sum(SPLIT), 8, generator=g), dim=-1)
    ids = torch.tensor([0, 1, 2, 3, 1, 5, 6])  # id 1 twice, on different workers
    return q, k, ids


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        q, k, ids = _global_batch()
        lo, hi = sum(SPLIT[:rank]), sum(SPLIT[: rank + 1])
        q, k = q[lo:hi].clone().requires_grad_(), k[lo:hi].clone().requires_grad_()
        loss = info_nce(q, k, 0.07, ids[lo:hi])
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        # Gradients are averaged over workers in training (finetune._average_gradients).
        np.save(f"{out}/q{rank}.npy", (q.grad / 2).numpy())
        np.save(f"{out}/k{rank}.npy", (k.grad / 2).numpy())
        np.save(f"{out}/loss{rank}.npy", (total / 2).numpy())
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_equal_one_worker(tmp_path):
    q, k, ids = _global_batch()
    q.requires_grad_()
    k.requires_grad_()
    loss = info_nce(q, k, 0.07, ids)
    loss.backward()
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        lo, hi = sum(SPLIT[:rank]), sum(SPLIT[: rank + 1])
        assert float(np.load(tmp_path / f"loss{rank}.npy")) == pytest.approx(loss.item(), abs=1e-5)
        np.testing.assert_allclose(np.load(tmp_path / f"q{rank}.npy"), q.grad[lo:hi].numpy(), atol=1e-5)
        np.testing.assert_allclose(np.load(tmp_path / f"k{rank}.npy"), k.grad[lo:hi].numpy(), atol=1e-5)
    assert k.grad.abs().max() > 1e-3  # the keys do get gradient (from every worker's queries)

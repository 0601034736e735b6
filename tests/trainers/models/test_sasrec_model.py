import torch

from trainers.losses import video_loss
from trainers.models import ModelSize, SASRec, SASRecConfig


def make_model() -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(num_videos=10, num_comments=30, size=ModelSize(hidden=16, inner=32, max_history=4))).eval()


def test_shapes_norms_and_empty_histories(history_batch):
    model = make_model()
    for b in (history_batch(), history_batch(empty=True)):
        user = model.user_video_vector(b)
        context = model.comment_context_vector(b, torch.tensor([1, 2]))
        assert user.shape == (2, 16) and context.shape == (2, 16)
        assert torch.isfinite(user).all() and torch.isfinite(context).all()
    items = model.video_item_vectors(torch.tensor([0, 9, 10]))
    assert torch.allclose(items[:2].norm(dim=-1), torch.ones(2), atol=1e-5)
    assert items[2].abs().sum() == 0  # beyond the ID table


def test_last_state_ignores_changes_it_cannot_see(history_batch):
    model = make_model()
    a = model.user_video_vector(history_batch())
    changed = history_batch()
    changed["hist_video"][1, 0] = 8  # a padding slot (mask False) of row 1
    b = model.user_video_vector(changed)
    assert torch.allclose(a[1], b[1])
    changed["hist_video"][1, 3] = 8  # row 1's newest video
    assert not torch.allclose(a[1], model.user_video_vector(changed)[1])


def test_a_few_steps_lower_the_video_loss(history_batch):
    model = make_model().train()
    b = {**history_batch(), "target": torch.tensor([5, 7]), "negatives": torch.tensor([[1, 2], [3, -1]])}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = video_loss(model, b, train_negatives=2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5

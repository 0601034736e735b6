import pytest
import torch

from trainers.checkpoint import CheckpointError, load_init_weights, save_checkpoint
from trainers.models import ModelSize, SRConfig, SRModel

V, C, D = 10, 30, 8


def make_model(dropout: float = 0.3, **overrides) -> SRModel:
    torch.manual_seed(0)
    size = ModelSize(hidden=16, num_heads=2, inner=32, max_history=4, dropout=dropout)
    config = SRConfig(num_videos=V, num_comments=C, text_dim=D, size=size, **overrides)
    model = SRModel(config)
    # Two more text rows than ID rows: items that arrived after training.
    model.set_text_tables(torch.randn(V + 2, D), torch.randn(C + 2, D))
    if config.use_id_embedding:
        seen_v = torch.ones(V, dtype=torch.bool)
        seen_v[3] = False
        model.set_seen(seen_v, torch.ones(C, dtype=torch.bool))
    return model.eval()


def test_shapes_and_unit_norm(history_batch):
    model = make_model()
    query = torch.tensor([1, 2])
    outputs = [model.user_video_vector(history_batch()), model.video_item_vectors(torch.arange(5)),
               model.comment_context_vector(history_batch(), query), model.comment_item_vectors(torch.arange(7))]
    assert [tuple(o.shape) for o in outputs] == [(2, 16), (5, 16), (2, 16), (7, 16)]
    for o in outputs:
        assert torch.allclose(o.norm(dim=-1), torch.ones(len(o)), atol=1e-5)


def test_scores_are_bounded_by_one_over_temperature(history_batch):
    model = make_model()
    user = model.user_video_vector(history_batch())
    scores = user @ model.video_item_vectors(torch.arange(V)).T / model.temperature
    assert scores.abs().max() <= 1 / 0.07 + 1e-4
    assert scores.abs().max() > 0.5  # not all zero


def test_empty_histories_give_finite_vectors_and_gradients(history_batch):
    model = make_model().train()
    user = model.user_video_vector(history_batch(empty=True))
    context = model.comment_context_vector(history_batch(empty=True), torch.tensor([0, 1]))
    assert torch.isfinite(user).all() and torch.isfinite(context).all()
    (user.sum() + context.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # A cold user is one learned vector, the same for every row.
    assert torch.allclose(model.eval().user_video_vector(history_batch(empty=True))[0],
                          model.user_video_vector(history_batch(empty=True))[1])


def test_encoders_are_causal(history_batch):
    model = make_model()
    before_v, before_c = model.encode_histories(history_batch())
    changed = history_batch()
    changed["hist_video"][0, 3] = 9  # the newest video of row 0
    changed["hist_cmt_comments"][0, 1, 0] = 20  # the newest comment record of row 0
    after_v, after_c = model.encode_histories(changed)
    assert torch.allclose(before_v[0, :3], after_v[0, :3])
    assert not torch.allclose(before_v[0, 3], after_v[0, 3])
    assert torch.allclose(before_c[0, :1], after_c[0, :1])
    assert not torch.allclose(before_c[0, 1], after_c[0, 1])


def test_unseen_and_new_items_have_no_id_signal():
    model = make_model()
    before = model.video_item_vectors(torch.tensor([2, 3, V + 1]))
    with torch.no_grad():
        model.video_id.weight.add_(1.0)  # changes every ID embedding
    after = model.video_item_vectors(torch.tensor([2, 3, V + 1]))
    assert not torch.allclose(before[0], after[0])  # seen: the ID part counts
    assert torch.allclose(before[1], after[1])  # unseen in training
    assert torch.allclose(before[2], after[2])  # newer than the model


def test_id_shrinkage_scales_the_id_part_by_train_appearances():
    model = make_model(id_shrinkage=True)
    model.set_seen(torch.tensor([0, 1, 5, 0, 20, 1, 1, 1, 1, 1]), torch.ones(C, dtype=torch.long))
    assert model.video_seen.tolist()[:5] == [False, True, True, False, True]
    idx = torch.tensor([0, 1, 2, 4, V + 1])
    with torch.no_grad():
        text_only = model.video_adapter(model.video_text[idx])
        id_part = torch.sigmoid(model.video_gate) * model.video_id.weight[idx.clamp(max=V - 1)]
        got = model.video_vec(idx) - text_only
    # k starts at 5: n / (n + 5) of the ID part; never-seen and newer-than-the-model items get none.
    for row, n in enumerate((0, 1, 5, 20)):
        assert torch.allclose(got[row], id_part[row] * n / (n + 5), atol=1e-6), n
    assert torch.allclose(got[4], torch.zeros(16))
    # k is learned.
    model.train()
    model.video_item_vectors(torch.tensor([1, 2])).sum().backward()
    assert model.id_log_k.grad[0] != 0
    # The counts travel with the checkpoint (a persistent buffer), like the seen masks.
    assert model.state_dict()["video_count"].tolist()[:5] == [0.0, 1.0, 5.0, 0.0, 20.0]


def test_text_only_model_has_no_id_tables(history_batch):
    model = make_model(use_id_embedding=False)
    assert model.config.text_only
    assert not any("_id." in name for name, _ in model.named_parameters())
    assert model.user_video_vector(history_batch()).shape == (2, 16)


def test_random_positions_only_while_training(history_batch):
    model = make_model(random_positions=True, max_position=20)
    assert torch.equal(model.user_video_vector(history_batch()), model.user_video_vector(history_batch()))
    model.train()
    torch.manual_seed(1)
    a, _ = model.encode_histories(history_batch())
    torch.manual_seed(2)
    b, _ = model.encode_histories(history_batch())
    assert not torch.allclose(a, b)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        SRConfig(num_videos=1, num_comments=1, size=ModelSize(hidden=10, num_heads=3))
    with pytest.raises(ValueError, match="num_videos"):
        SRConfig(num_videos=0, num_comments=0)
    assert SRConfig(num_videos=0, num_comments=0, use_id_embedding=False).max_position == 50


def test_init_from_a_text_only_checkpoint(tmp_path):
    stage1 = make_model(use_id_embedding=False)
    save_checkpoint(tmp_path / "stage1", "sr", stage1.config, stage1.state_dict())
    model = make_model(dropout=0.1)
    fresh = load_init_weights(model, tmp_path / "stage1")
    assert set(fresh) == {"video_id.weight", "comment_id.weight", "video_gate", "comment_gate"}
    assert torch.equal(model.video_adapter.weight, stage1.video_adapter.weight)
    bigger = SRModel(SRConfig(num_videos=V, num_comments=C, text_dim=D, size=ModelSize(hidden=32, max_history=4)))
    with pytest.raises(CheckpointError, match="shape"):
        load_init_weights(bigger, tmp_path / "stage1")


def test_history_match_adds_the_mean_history_comment_vector(history_batch):
    model = make_model(history_match=True)
    batch = history_batch()
    # Row 0 engaged with comments 1, 2 and 3 (-1 slots are "no comment"); row 1 has no comment history.
    with torch.no_grad():
        expect = torch.nn.functional.normalize(model.comment_vec(torch.tensor([1, 2, 3])), dim=-1).mean(0)
        got = model.history_comments(batch)
    assert torch.allclose(got[0], expect, atol=1e-6) and torch.equal(got[1], torch.zeros(16))
    # With the learned part silenced, the context is that mean's direction.
    with torch.no_grad():
        model.context_mlp[-1].weight.zero_()
        model.context_mlp[-1].bias.zero_()
        context = model.comment_context_vector(batch, torch.tensor([1, 2]))
    assert torch.allclose(context[0], torch.nn.functional.normalize(expect, dim=-1), atol=1e-6)
    # Off by default: a config saved before it loads without the weight.
    assert not hasattr(make_model(), "history_weight")

import pyarrow.parquet as pq
import pytest
import torch

from features.embeddings import make_encoder
from serving.catalog import extend_state
from serving.state import load_state
from tests.serving.conftest import make_checkpoint

pytestmark = pytest.mark.integration  # the features fixture runs Ray


def test_new_items_score_by_text_like_their_twins(serving_features, tmp_path):
    state = load_state("v1", make_checkpoint(serving_features, tmp_path / "ckpt", seed=4), serving_features)
    videos = pq.read_table(serving_features / "videos.parquet").to_pylist()
    twin = videos[5]
    encode = make_encoder("hash", state.encoder_dim).encode
    new_video = {"video_id": "brand-new", "title": twin["title"], "tags": twin["tags"], "author_id": "a", "ts": 1}
    comments = [{"comment_id": "new-c1", "video_id": "brand-new", "text": "first!", "parent_id": None, "ts": 2},
                {"comment_id": "orphan", "video_id": "not-yet-published", "text": "?", "parent_id": None, "ts": 3}]
    grown = extend_state(state, [new_video, new_video], comments, encode)

    v = len(videos)
    assert grown.video_index["brand-new"] == v and len(grown.video_ids) == v + 1
    assert grown.comment_index["new-c1"] == len(state.comment_ids) and "orphan" not in grown.comment_index
    assert grown.comments_of_video[v].tolist() == [grown.comment_index["new-c1"]]
    # The old state is untouched (requests in flight keep using it).
    assert len(state.video_ids) == v and state.scorer.video_matrix.shape[0] == v
    user = pq.read_table(serving_features / "users.parquet").to_pylist()[0]
    hist = grown.scorer.histories({k: [val] for k, val in user.items() if k.startswith("hist_")})
    scores = grown.scorer.video_scores(hist)[0]
    # Same text, and neither has a trained ID embedding (random checkpoint, nothing marked seen): same score.
    assert torch.isclose(scores[v], scores[twin["video_idx"]], atol=1e-5)
    assert extend_state(grown, [new_video], [], encode) is grown  # nothing new: same state

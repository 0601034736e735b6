import math

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from trainers.checkpoint import save_checkpoint
from trainers.evaluate import evaluate, format_table, without_age_terms
from trainers.models import ModelSize, SASRec, SASRecConfig

EMPTY = {"hist_video": [], "hist_video_hot": [], "hist_video_ts": [], "hist_cmt_video": [],
         "hist_cmt_comments": [], "hist_cmt_ts": []}


def video_row(target, negatives):
    return {"user_id": "u", "event_id": f"e{target}", "ts": 10, "target": target, "negatives": negatives, **EMPTY}


def comment_row(likes, negative_likes):
    negatives = list(range(1, 1 + len(negative_likes)))
    return {"user_id": "u", "event_id": "e", "ts": 10, "query_video": 0, "target": 0, "negatives": negatives,
            "target_likes": likes, "negative_likes": negative_likes, **EMPTY}


def write_catalogs(root, video_ts, comment_ts, parents=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"ts": pa.array(video_ts, pa.int64())}), root / "videos.parquet")
    parents = parents or [None] * len(comment_ts)
    pq.write_table(pa.table({"comment_id": [f"c{i}" for i in range(len(comment_ts))],
                             "parent_id": pa.array(parents, pa.string()), "ts": pa.array(comment_ts, pa.int64())}),
                   root / "comments.parquet")


def test_popularity_on_a_hand_made_case(tmp_path, features_writer):
    write_examples, write_embeddings = features_writer
    write_embeddings(tmp_path, np.eye(4, 2), np.eye(6, 2))
    write_catalogs(tmp_path, video_ts=[1, 2, 3, 4], comment_ts=[1, 2, 3, 4, 5, 6])
    write_examples(tmp_path, "video", "valid", [video_row(1, [0])])
    write_examples(tmp_path, "video", "train", [video_row(1, [0]), video_row(1, [0]), video_row(2, [0])])
    # Train counts: video 0 -> 0, 1 -> 2, 2 -> 1, 3 -> 0.
    write_examples(tmp_path, "video", "test", [video_row(1, [0, 2, 3]),  # 2 beats 0, 1, 0: rank 0
                                                video_row(3, [0, 1, 2])])  # 0 ties or loses to all: rank 3
    write_examples(tmp_path, "comment", "train", [])
    write_examples(tmp_path, "comment", "valid", [])
    write_examples(tmp_path, "comment", "test", [
        comment_row(5, [3, 7]),  # rank 1
        comment_row(9, []),  # no negatives: skipped
        comment_row(2, [2]),  # a tie counts against the target: rank 1
        comment_row(4, [0, 1, 2]),  # rank 0
    ])
    results = evaluate(tmp_path, {}, split="test")
    video = results["video"]["popularity"]
    assert video["count"] == 2 and video["skipped"] == 0
    assert video["recall@1"] == pytest.approx(0.5)
    assert video["recall@5"] == pytest.approx(1.0)
    assert video["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 2)
    assert video["mrr@5"] == pytest.approx((1 + 1 / 4) / 2)
    comment = results["comment"]["popularity"]
    assert comment["count"] == 3 and comment["skipped"] == 1
    assert comment["recall@1"] == pytest.approx(1 / 3)
    assert comment["mrr@5"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert comment["ndcg@5"] == pytest.approx((2 / math.log2(3) + 1) / 3)
    table = format_table(results)
    assert "video task" in table and "comment task" in table and "popularity" in table
    assert "0.5000" in table and "(1 examples without negatives skipped)" in table


def test_models_and_popularity_in_one_run(fake_features, tmp_path):
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_videos=48, num_comments=192, size=ModelSize(hidden=16, inner=32, max_history=8)))
    save_checkpoint(tmp_path, "sasrec", model.config, model.state_dict())
    results = evaluate(fake_features, {"sasrec": tmp_path}, split="test", batch_size=16)
    assert set(results["video"]) == {"popularity", "sasrec", "recency", "popularity_at_t", "recency_pop_blend"}
    assert set(results["comment"]) == {"popularity", "sasrec", "newest", "most_engaged", "top_level"}
    assert results["protocol"] == "uniform_all" and results["recency_pop_blend_tau_h"] in (1.0, 3.0, 6.0, 12.0,
                                                                                          24.0, 48.0, 96.0, 192.0)
    empty = sum(len(n) == 0 for n in pads.dataset(fake_features / "examples/comment/test").to_table()
                .column("negatives").to_pylist())
    assert empty > 0
    for name in ("popularity", "sasrec"):
        assert results["video"][name]["count"] == 40
        assert results["comment"][name]["count"] == 40 - empty
        assert results["comment"][name]["skipped"] == empty
    with pytest.raises(ValueError, match="twice"):
        evaluate(fake_features, {"popularity": tmp_path})
    assert format_table({"video": {"m": {"count": 0, "recall@1": None}}}).count(" -") >= 1


def test_scores_without_age_terms_only_for_models_with_time_features(fake_features, tmp_path):
    torch.manual_seed(0)
    size = ModelSize(hidden=16, inner=32, max_history=8)
    timed = SASRec(SASRecConfig(num_videos=48, num_comments=192, size=size, time_features=True))
    with torch.no_grad():  # a freshness term strong enough to decide: the more newer videos, the better
        timed.video_fresh.hidden.weight.zero_()
        timed.video_fresh.hidden.weight[0, 2] = 5.0
        timed.video_fresh.out.weight[0, 0] = 10.0
    save_checkpoint(tmp_path / "timed", "sasrec", timed.config, timed.state_dict())
    plain = SASRec(SASRecConfig(num_videos=48, num_comments=192, size=size))
    save_checkpoint(tmp_path / "plain", "sasrec", plain.config, plain.state_dict())
    checkpoints = {"timed": tmp_path / "timed", "plain": tmp_path / "plain"}
    got = without_age_terms(fake_features, checkpoints, batch_size=16)
    assert set(got) == {"video", "comment"} and set(got["video"]) == {"timed"}
    full = evaluate(fake_features, {"timed": tmp_path / "timed"}, batch_size=16)
    assert got["video"]["timed"] != pytest.approx(full["video"]["timed"]["ndcg@10"])
    assert without_age_terms(fake_features, {"plain": tmp_path / "plain"}) == {}


def test_time_baselines_score_a_hand_made_example():
    from trainers.baselines import CountsBefore, blend_scores, recency_scores, top_level_scores

    idx = np.array([[2, 0, -1]])
    item_ts = np.array([10, 20, 30])
    assert recency_scores(item_ts, idx).tolist() == [[30.0, 10.0, float("-inf")]]
    # Interactions: item 0 at 5 and 50, item 2 at 40: before 45, item 2 has 1 and item 0 has 1; before 41 too.
    counts = CountsBefore(np.array([0, 0, 2]), np.array([5, 50, 40]))
    assert counts(idx, np.array([45])).tolist() == [[1, 1, 0]]
    assert counts(idx, np.array([40])).tolist() == [[0, 1, 0]]  # strictly before
    # Blend at t = 3_600_030 ms: ages 1 h - 30 ms (item 2) and about 1 h (item 0), tau 1 h.
    blend = blend_scores(item_ts, np.array([[3, 0, 0]]), idx, np.array([3_600_030]), tau_h=1.0).numpy()
    assert blend[0, 0] == pytest.approx(math.log(4) - 1.0, abs=1e-4) and blend[0, 1] == pytest.approx(-1.0, abs=1e-4)
    # Top level first: comment 1 is a reply; among top-level ones the newer (2) first.
    top = top_level_scores(np.array([True, False, True]), item_ts, np.array([[0, 1, 2]])).numpy()[0]
    assert top[2] > top[0] > top[1]


def test_full_corpus_ranks_the_target_among_every_video_alive_then(tmp_path, features_writer):
    from features.folder import FeaturesFolder
    from trainers.evaluate import rank_task

    write_examples, write_embeddings = features_writer
    write_embeddings(tmp_path, np.eye(8, 2), np.eye(1, 2))
    write_catalogs(tmp_path, video_ts=[0, 10, 20, 30, 40, 50, 60, 70], comment_ts=[1])
    write_examples(tmp_path, "video", "train", [])
    (tmp_path / "manifest.json").write_text('{"alive_window_ms": 30, "num_negatives": 2}')

    def at(ts, target):
        return {**video_row(target, [0]), "ts": ts, "event_id": f"e{ts}-{target}"}

    # W = 30: alive at ts 45 are videos published in [15, 45): 2, 3, 4. At ts 55: 3, 4, 5 (equal-sized pools
    # too, which a plain np.array would turn 2-D). At ts 75: 5, 6, 7.
    write_examples(tmp_path, "video", "test", [at(45, 4), at(55, 3), at(75, 5)])
    older_first = lambda task, batch: -torch.cat([batch["target"][:, None], batch["negatives"]], 1).double()  # noqa: E731
    older_first.max_history = 1
    ranking = rank_task(FeaturesFolder(tmp_path), {"older_first": older_first}, "video", "test",
                        full_corpus=True)
    # Candidates: the target and the two others of its pool; older first ranks 4 among {2, 3, 4} last (2),
    # 3 among {3, 4, 5} first (0), 5 among {5, 6, 7} first (0).
    assert ranking.candidates.tolist() == [3, 3, 3]
    assert ranking.ranks["older_first"].tolist() == [2, 0, 0]


def test_a_model_trained_over_other_item_tables_is_scored_with_them(fake_features, tmp_path):
    """`tables` gives a checkpoint the tables of another folder with the same examples (a re-embedded copy):
    its figures are those of evaluating it on that folder, and not those of the main folder's tables."""
    import json
    import shutil

    from core import contract
    from trainers.models.sr import SRConfig, SRModel

    other = tmp_path / "other"
    shutil.copytree(fake_features, other)
    rng = np.random.default_rng(1)
    for name in (contract.VIDEO_EMB, contract.COMMENT_EMB):
        table = np.load(fake_features / name)
        np.save(other / name, table[rng.permutation(len(table))])
    torch.manual_seed(0)
    model = SRModel(SRConfig(text_dim=32, size=ModelSize(hidden=16, inner=32, max_history=8), use_id_embedding=False))
    save_checkpoint(tmp_path / "sr", "sr", model.config, model.state_dict())
    checkpoints = {"sr": tmp_path / "sr"}
    mixed = evaluate(fake_features, checkpoints, batch_size=16, tables={"sr": other})
    own = evaluate(other, checkpoints, batch_size=16)
    main = evaluate(fake_features, checkpoints, batch_size=16)
    for task in ("video", "comment"):
        assert mixed[task]["sr"] == own[task]["sr"]
        assert mixed[task]["popularity"] == main[task]["popularity"]
    assert mixed["video"]["sr"] != main["video"]["sr"]
    with pytest.raises(ValueError, match="not among the checkpoints"):
        evaluate(fake_features, checkpoints, tables={"sasrec": other})
    manifest = json.loads((other / contract.MANIFEST).read_text())
    (other / contract.MANIFEST).write_text(json.dumps({**manifest, "cut_ts": 123}))
    with pytest.raises(ValueError, match="does not hold the examples"):
        evaluate(fake_features, checkpoints, tables={"sr": other})

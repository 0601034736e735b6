"""Statistics fitted from the features folder read the train split only: with split=global_time every train
example lies before the valid cut (tests/features/test_sequences.py), so none of them sees an evaluation event."""

import numpy as np

from core import contract
from features.folder import FeaturesFolder
from trainers.baselines import video_train_counts
from trainers.finetune import seen_items


def test_popularity_and_seen_masks_count_train_examples_only(tmp_path, features_writer):
    write_examples, write_embeddings = features_writer
    write_embeddings(tmp_path, np.zeros((6, 2)), np.zeros((4, 2)))
    empty = {name: [] for name in contract.HISTORY_COLUMNS}

    def video(event, target, ts, hist_video, negatives):
        return {"user_id": "u", "event_id": event, "ts": ts, "target": target, "negatives": negatives,
                **empty, "hist_video": hist_video, "hist_video_hot": [-1] * len(hist_video),
                "hist_video_ts": [ts - 1] * len(hist_video)}

    def comment(event, target, ts, query_video):
        return {"user_id": "u", "event_id": event, "ts": ts, "query_video": query_video, "target": target,
                "negatives": [], "target_likes": 0, "negative_likes": [], **empty}

    # Train: targets 0, 0, 1; valid and test bring videos 3, 4, 5 and comment 3, seen only there.
    write_examples(tmp_path, "video", "train", [video("a", 0, 10, [], [2]), video("b", 0, 11, [], [1]),
                                                video("c", 1, 12, [0], [0])])
    write_examples(tmp_path, "video", "valid", [video("d", 3, 20, [0, 1], [5])])
    write_examples(tmp_path, "video", "test", [video("e", 4, 30, [3, 5], [0])])
    write_examples(tmp_path, "comment", "train", [comment("f", 0, 10, 0)])
    write_examples(tmp_path, "comment", "test", [comment("g", 3, 31, 4)])
    folder = FeaturesFolder(tmp_path)

    assert video_train_counts(folder).tolist() == [2, 1, 0, 0, 0, 0]
    seen_video, seen_comment = seen_items(folder, 6, 4)
    # Targets, histories and negatives of train examples count (2 is a negative only), nothing after the cut.
    assert (seen_video > 0).tolist() == [True, True, True, False, False, False]
    assert (seen_comment > 0).tolist() == [True, False, False, False]

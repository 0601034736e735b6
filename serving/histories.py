"""Fresh user histories: rows from the online sequence store (raw ids) -> the history columns the model takes.

Same rules as the feature build (docs/DATA.md section 3): positive video interactions in time order, each
with its video's hot comment; comment-section records of up to 3 distinct comments, ordered by their latest
interaction. Items this model version does not know yet are skipped.
"""

import numpy as np

from core.contract import COMMENTS_PER_RECORD


def history_from_store(rows: dict, video_index: dict[str, int], comment_index: dict[str, int],
                       hot_of_video: np.ndarray, max_history: int) -> dict | None:
    """A batch of one in the history-column layout, or None when the store knows nothing usable of the user."""
    videos, hots, video_ts = [], [], []
    for video_id, ts in zip(rows["video_ids"], rows["video_ts"]):
        v = video_index.get(video_id)
        if v is not None:
            videos.append(v)
            hots.append(int(hot_of_video[v]))
            video_ts.append(int(ts))
    records: dict[int, tuple[list[int], int]] = {}  # video_idx -> (comments oldest first, latest ts)
    for comment_id, video_id, ts in zip(rows["comment_ids"], rows["comment_video_ids"], rows["comment_ts"]):
        v, c = video_index.get(video_id), comment_index.get(comment_id)
        if v is None or c is None:
            continue
        comments, _ = records.pop(v, ([], 0))  # re-inserting keeps the dict ordered by latest interaction
        comments = [x for x in comments if x != c] + [c]
        records[v] = (comments[-COMMENTS_PER_RECORD:], int(ts))
    if not videos and not records:
        return None
    kept = list(records.items())[-max_history:]
    flat = [c for _, (comments, _) in kept for c in comments + [-1] * (COMMENTS_PER_RECORD - len(comments))]
    return {
        "hist_video": [videos[-max_history:]],
        "hist_video_hot": [hots[-max_history:]],
        "hist_video_ts": [video_ts[-max_history:]],
        "hist_cmt_video": [[v for v, _ in kept]],
        "hist_cmt_comments": [flat],
        "hist_cmt_ts": [[ts for _, (_, ts) in kept]],
    }


def latest_hot_comments(hist_video: list[list[int]], hist_hot: list[list[int]], hist_ts: list[list[int]],
                        num_videos: int) -> np.ndarray:
    """Each video's most recently observed hot comment in the users' histories (-1 if never seen)."""
    hot = np.full(num_videos, -1, dtype=np.int64)
    if not hist_video:
        return hot
    v = np.concatenate([np.asarray(h, dtype=np.int64) for h in hist_video] + [np.zeros(0, np.int64)])
    c = np.concatenate([np.asarray(h, dtype=np.int64) for h in hist_hot] + [np.zeros(0, np.int64)])
    t = np.concatenate([np.asarray(h, dtype=np.int64) for h in hist_ts] + [np.zeros(0, np.int64)])
    order = np.argsort(t, kind="stable")
    hot[v[order]] = c[order]  # later assignments win: the newest observation per video
    return hot

"""The feature benchmark's baseline: the sequence build of `features/build.py` written the plain way, in pandas,
in one process (no Ray; it shares with the Ray path only the seeded samplers that define "negatives fixed by
seed", and the per-row video-negative step built on them).

Same rules (DESIGN.md section 5, docs/DATA.md section 3), computed differently on purpose, so that the
benchmark's row-for-row comparison is also a cross-check of the Ray build:

- catalogs sorted by (ts, id), dense index = row number;
- hot comments and comment candidates by one sweep per video over its events in time order (queries before
  likes at an equal ts, so a like is never visible at its own ts);
- histories by one sweep per user, applying all events of one ts only after every example at that ts has
  taken its snapshot;
- leave-last-out or global-time splits, then video negatives.

`build_pandas(...)` returns the same dict of Arrow tables as `features.sequences.build_local` (the examples
of each task and split, and the users' histories as of the end of the log).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from core.contract import COMMENTS_PER_RECORD, EXAMPLE_SCHEMA, SPLITS
from features.arrays import sample_excluding, stable_seed
from features.negatives import add_video_negatives
from ingestion.schema import POSITIVE_COMMENT_ACTIONS, POSITIVE_VIDEO_ACTIONS

HIST_KEYS = ("hist_video", "hist_video_hot", "hist_video_ts", "hist_cmt_video", "hist_cmt_comments", "hist_cmt_ts")


def _frame(table) -> pd.DataFrame:
    return table.to_pandas() if isinstance(table, pa.Table) else table.copy()


def _catalogs(videos: pd.DataFrame, comments: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    for name, frame, key in (("videos", videos, "video_id"), ("comments", comments, "comment_id")):
        if frame[key].duplicated().any():
            raise ValueError(f"{name}: ids must be unique, found duplicates such as "
                             f"{frame[key][frame[key].duplicated()].head(5).tolist()}")
    videos = videos.sort_values(["ts", "video_id"], kind="stable").reset_index(drop=True)
    videos["video_idx"] = np.arange(len(videos), dtype=np.int32)
    video_idx = pd.Series(videos["video_idx"].values, index=videos["video_id"].values)
    comments = comments[comments["video_id"].isin(video_idx.index)].copy()
    comments["video_idx"] = comments["video_id"].map(video_idx).astype(np.int32)
    comments = comments.sort_values(["ts", "comment_id"], kind="stable").reset_index(drop=True)
    comments["comment_idx"] = np.arange(len(comments), dtype=np.int32)
    return videos, comments


def _events(videos, comments, video_events, comment_events, positive_video, positive_comment, cut_ts):
    """Used events in one frame: kind "v" (positive video event), "c" (positive comment event), "l" (a like
    that is not itself a positive event, so it only counts toward popularity)."""
    video_idx = pd.Series(videos["video_idx"].values, index=videos["video_id"].values)
    ve = video_events[video_events["action"].isin(positive_video) & video_events["video_id"].isin(video_idx.index)]
    ve = pd.DataFrame({"event_id": ve["event_id"], "user_id": ve["user_id"], "ts": ve["ts"], "kind": "v",
                       "video_idx": ve["video_id"].map(video_idx), "comment_idx": -1, "like": False})
    by_comment = comments.set_index("comment_id")
    ce = comment_events[comment_events["comment_id"].isin(by_comment.index)
                        & (comment_events["action"].isin(positive_comment) | (comment_events["action"] == "like"))]
    ce = pd.DataFrame({"event_id": ce["event_id"], "user_id": ce["user_id"], "ts": ce["ts"],
                       "kind": np.where(ce["action"].isin(positive_comment), "c", "l"),
                       "video_idx": ce["comment_id"].map(by_comment["video_idx"]),
                       "comment_idx": ce["comment_id"].map(by_comment["comment_idx"]),
                       "like": (ce["action"] == "like").values})
    events = pd.concat([ve, ce], ignore_index=True)
    if cut_ts is not None:
        events = events[events["ts"] <= cut_ts]
    events = events.astype({"video_idx": np.int32, "comment_idx": np.int32, "ts": np.int64, "like": bool})
    return events.reset_index(drop=True)


def _annotate(events: pd.DataFrame, comments: pd.DataFrame, num_negatives: int, seed: int) -> pd.DataFrame:
    """Per positive event: `hot` (video events), `negatives` / `target_likes` / `negative_likes` (comment
    events), all as of the event's ts, by a sweep over each video's events."""
    hot = np.full(len(events), -1, np.int32)
    target_likes = np.zeros(len(events), np.int32)
    rankable = np.ones(len(events), bool)  # comment events: the target was published strictly before ts
    negatives: list[list[int]] = [[] for _ in range(len(events))]
    negative_likes: list[list[int]] = [[] for _ in range(len(events))]
    comments_of = {v: (g["comment_idx"].to_numpy(), g["ts"].to_numpy())
                   for v, g in comments.groupby("video_idx", sort=False)}
    empty = (np.zeros(0, np.int32), np.zeros(0, np.int64))
    events = events.assign(row=np.arange(len(events)))
    for video, group in events.sort_values(["video_idx", "ts"], kind="stable").groupby("video_idx", sort=False):
        pub_idx, pub_ts = comments_of.get(video, empty)  # this video's comments in publication order
        local_of = {int(c): i for i, c in enumerate(pub_idx)}
        likes = np.zeros(len(pub_idx), np.int64)  # likes so far, per local comment
        pending: list[int] = []  # likes at the current ts: visible only after every query at that ts
        now = None
        for row, kind, ts, comment, like, event_id in zip(group["row"].values, group["kind"].values,
                                                           group["ts"].values, group["comment_idx"].values,
                                                           group["like"].values, group["event_id"].values):
            if ts != now:
                for local in pending:
                    likes[local] += 1
                pending, now = [], ts
            if like:
                pending.append(local_of[int(comment)])
            published = int(np.searchsorted(pub_ts, ts, side="left"))  # comments published strictly before ts
            if kind == "v":
                # argmax returns the first maximum: ties go to the earlier-published comment.
                hot[row] = pub_idx[int(np.argmax(likes[:published]))] if published else -1
            elif kind == "c":
                target = local_of[int(comment)]
                target_likes[row] = likes[target]
                rankable[row] = target < published
                rng = np.random.default_rng(stable_seed(seed, "comment", event_id))
                picks = sample_excluding(rng, 0, published, target, num_negatives)
                negatives[row] = pub_idx[picks].tolist()
                negative_likes[row] = likes[picks].tolist()
    events = events.assign(hot=hot, target_likes=target_likes, negatives=negatives, negative_likes=negative_likes,
                           rankable=rankable)
    return events[events["kind"] != "l"].drop(columns=["row"])


def _user_examples(events: pd.DataFrame, max_history: int) -> tuple[list[dict], list[dict]]:
    """Examples (one per positive event, with both histories as of its ts) and user rows (histories after
    every event), by a sweep over each user's events in (ts, event_id) order."""
    examples, users = [], []
    rows = events.sort_values(["user_id", "ts", "event_id"], kind="stable").to_dict("records")
    first = 0
    while first < len(rows):
        last = first  # rows[first:last] are this user's events
        while last < len(rows) and rows[last]["user_id"] == rows[first]["user_id"]:
            last += 1
        video_hist: list[tuple[int, int, int]] = []  # (video_idx, hot, ts), oldest first
        records: dict[int, list[int]] = {}  # video_idx -> its comments; order = latest interaction last
        record_ts: dict[int, int] = {}
        start = first
        while start < last:
            end = start  # rows[start:end] share one ts: none of them sees another
            while end < last and rows[end]["ts"] == rows[start]["ts"]:
                end += 1
            snapshot = _histories(video_hist, records, record_ts, max_history)
            for row in rows[start:end]:
                examples.append({**row, **snapshot})
            for row in rows[start:end]:
                if row["kind"] == "v":
                    video_hist.append((row["video_idx"], row["hot"], row["ts"]))
                else:
                    kept = [c for c in records.pop(row["video_idx"], []) if c != row["comment_idx"]]
                    records[row["video_idx"]] = (kept + [row["comment_idx"]])[-COMMENTS_PER_RECORD:]
                    record_ts[row["video_idx"]] = row["ts"]
            start = end
        users.append({"user_id": rows[first]["user_id"], **_histories(video_hist, records, record_ts, max_history)})
        first = last
    return examples, users


def _histories(video_hist, records, record_ts, max_history) -> dict[str, list]:
    recent = video_hist[-max_history:]
    latest = list(records)[-max_history:]
    return {
        "hist_video": [v for v, _, _ in recent],
        "hist_video_hot": [h for _, h, _ in recent],
        "hist_video_ts": [t for _, _, t in recent],
        "hist_cmt_video": latest,
        "hist_cmt_comments": [c for v in latest for c in records[v] + [-1] * (COMMENTS_PER_RECORD - len(records[v]))],
        "hist_cmt_ts": [record_ts[v] for v in latest],
    }


def _splits(frames: dict[str, pd.DataFrame], rankable: pd.Series, split: str, valid_ts: int,
            test_ts: int) -> dict[str, pd.Series]:
    """Split of each example of both tasks: "unrankable" when its target was not published before it,
    "dropped" when both histories are empty, else the policy's. Leave-last-out cuts each user's time once
    for both tasks: at the earliest of the tasks' last example times (tasks with 2 or more examples) for
    test, the earliest second-to-last (tasks with 3 or more) for valid."""
    kept = {}
    for task, frame in frames.items():
        dropped = (frame["hist_video"].str.len() == 0) & (frame["hist_cmt_video"].str.len() == 0)
        kept[task] = frame[~dropped & rankable[frame.index]]
    if split == "leave_last_out":
        never = np.iinfo(np.int64).max
        ends = []
        for frame in kept.values():
            ordered = frame.sort_values(["user_id", "ts", "event_id"], kind="stable")
            by_user = ordered.groupby("user_id")["ts"]
            n = by_user.transform("size")
            from_end = n - by_user.cumcount()  # 1 = the user's last example of this task
            ends.append(pd.DataFrame({"user_id": ordered["user_id"],
                                      "test_ts": ordered["ts"].where((from_end == 1) & (n >= 2), never),
                                      "valid_ts": ordered["ts"].where((from_end == 2) & (n >= 3), never)}))
        per_user = pd.concat(ends).groupby("user_id")[["valid_ts", "test_ts"]].min()
        per_user["valid_ts"] = per_user[["valid_ts", "test_ts"]].min(axis=1)
    elif split != "global_time":
        raise ValueError(f"unknown split policy {split!r}")
    out = {}
    for task, frame in frames.items():
        labels = pd.Series(np.where(rankable[frame.index], "dropped", "unrankable"), index=frame.index, dtype=object)
        rows = kept[task]
        if split == "leave_last_out":
            valid = per_user.loc[rows["user_id"], "valid_ts"].to_numpy()
            test = per_user.loc[rows["user_id"], "test_ts"].to_numpy()
        else:
            valid, test = valid_ts, test_ts
        labels[rows.index] = np.where(rows["ts"] < valid, "train", np.where(rows["ts"] < test, "valid", "test"))
        out[task] = labels
    return out


def _without_user_positives(comment: pd.DataFrame, annotated: pd.DataFrame) -> pd.DataFrame:
    """Comment candidates without the user's positives on the same video at or before the example's time."""
    events = annotated[annotated["kind"] == "c"]
    by_key = {key: list(zip(g["ts"], g["comment_idx"])) for key, g in events.groupby(["user_id", "video_idx"])}
    negatives, likes = [], []
    for user, video, target, ts, neg, lik in zip(comment["user_id"], comment["video_idx"], comment["comment_idx"],
                                                comment["ts"], comment["negatives"], comment["negative_likes"]):
        others = {c for t, c in by_key.get((user, video), []) if t <= ts and c != target}
        keep = [j for j, c in enumerate(neg) if c not in others]
        negatives.append([neg[j] for j in keep])
        likes.append([lik[j] for j in keep])
    return comment.assign(negatives=negatives, negative_likes=likes)


def _arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


def build_pandas(
    videos, comments, video_events, comment_events, *,
    max_history: int = 50,
    num_negatives: int = 99,
    seed: int = 0,
    window_ms: int = 0,
    protocol: str = "alive_window",
    positive_video_actions: tuple[str, ...] = tuple(sorted(POSITIVE_VIDEO_ACTIONS)),
    positive_comment_actions: tuple[str, ...] = tuple(sorted(POSITIVE_COMMENT_ACTIONS)),
    split: str = "leave_last_out",
    valid_ts: int = 0,
    test_ts: int = 0,
    cut_ts: int | None = None,
) -> dict[str, pa.Table]:
    """The feature build in one process with pandas; inputs are event-log tables (Arrow or pandas).

    Returns {"users", "video/<split>", "comment/<split>"} as Arrow tables in the written files' schemas.
    """
    videos, comments = _catalogs(_frame(videos), _frame(comments))
    events = _events(videos, comments, _frame(video_events), _frame(comment_events),
                     set(positive_video_actions), set(positive_comment_actions), cut_ts)
    annotated = _annotate(events, comments, num_negatives, seed)
    examples, users = _user_examples(annotated, max_history)
    examples = pd.DataFrame(examples, columns=[*annotated.columns, *HIST_KEYS])

    out = {"users": _arrow(pd.DataFrame(users, columns=["user_id", *HIST_KEYS]), EXAMPLE_SCHEMA["user"])}
    video = examples[examples["kind"] == "v"].copy()
    video["target"] = video["video_idx"]
    # Video negatives: a per-row draw with no grouping, done by the shared seeded sampler (the definition of
    # "fixed by seed" under each candidate protocol), so both builds spend the same time on it.
    plain = [n for n in EXAMPLE_SCHEMA["video"].names if n != "negatives" and not n.startswith("negatives_")]
    drawn = add_video_negatives(_arrow(video, pa.schema([EXAMPLE_SCHEMA["video"].field(n) for n in plain])),
                                videos["ts"].to_numpy(), num_negatives, seed, window_ms, protocol,
                                video["ts"].to_numpy(), video["video_idx"].to_numpy()).to_pandas()
    video = drawn.set_index(video.index)
    comment = _without_user_positives(examples[examples["kind"] == "c"].copy(), annotated)
    comment["target"], comment["query_video"] = comment["comment_idx"], comment["video_idx"]
    frames = {"video": video, "comment": comment}
    labels = _splits(frames, examples["rankable"], split, valid_ts, test_ts)
    for task, frame in frames.items():
        for name in SPLITS:
            out[f"{task}/{name}"] = _arrow(frame[labels[task] == name], EXAMPLE_SCHEMA[task])
    return out

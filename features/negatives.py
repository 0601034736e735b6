"""Video negatives: the candidate lists of video-task examples under every protocol of VIDEO_PROTOCOLS
(core/contract.py says what each one samples); `negatives` holds the configured one, `negatives_<protocol>`
every one. Runs on stage B's video rows. Pure functions on Arrow tables.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from core.contract import VIDEO_PROTOCOLS
from features.arrays import list_array, sample_excluding, stable_seed


def alive_bounds(video_ts: np.ndarray, ts: np.ndarray, num_negatives: int,
                 window_ms: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """([E] lo, [E] hi): the videos alive at each event time are video_ts[lo:hi] (video_ts sorted), those
    published in [ts - W_t, ts). W_t is window_ms when > 0; else it is decided per event: the smallest window
    holding num_negatives + 1 videos published before ts (all of them when fewer exist; videos published at
    the same time as the oldest one needed are in too). A feed's pool is what it could show at that moment,
    so a quiet week elsewhere in the log does not widen it."""
    video_ts, ts = np.asarray(video_ts), np.asarray(ts, np.int64)
    hi = np.searchsorted(video_ts, ts, side="left")  # videos published strictly before ts
    if window_ms > 0:
        return np.searchsorted(video_ts, ts - window_ms, side="left"), hi
    if len(video_ts) == 0:
        return np.zeros_like(hi), hi
    oldest_needed = np.maximum(hi - num_negatives - 1, 0)
    return np.minimum(np.searchsorted(video_ts, video_ts[np.minimum(oldest_needed, len(video_ts) - 1)],
                                      side="left"), hi), hi


def window_summary(video_ts: np.ndarray, ts: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> dict:
    """min / median / p90 / max of the events' alive windows W_t (ms), over events with a video before them."""
    has = hi > lo
    if not has.any():
        return {"events": 0}
    w = np.asarray(ts, np.int64)[has] - np.asarray(video_ts)[lo[has]]
    return {"events": int(has.sum()), "min_ms": int(w.min()), "median_ms": float(np.median(w)),
            "p90_ms": float(np.percentile(w, 90)), "max_ms": int(w.max())}


def _sample_weighted(rng: np.random.Generator, weights: np.ndarray, exclude: int, k: int) -> np.ndarray:
    """Up to k distinct indices of `weights` other than `exclude`, drawn without replacement in proportion to
    the weights (exponential keys: the k smallest of Exp(1) / w); zero-weight ones only to fill up to k,
    uniformly. Sorted."""
    n = len(weights)
    keys = rng.exponential(size=n)
    with np.errstate(divide="ignore"):
        keys = np.where(weights > 0, keys / np.maximum(weights, 1e-300), np.inf)
    # Zero-weight items come after every weighted one, in a uniform order among themselves.
    order = np.lexsort((rng.random(n), keys))
    if 0 <= exclude < n:
        order = order[order != exclude]
    return np.sort(order[:k]).astype(np.int32)


def add_video_negatives(
    batch: pa.Table, video_ts: np.ndarray, num_negatives: int, seed: int, window_ms: int = 0,
    protocol: str = "uniform_all", interaction_ts: np.ndarray | None = None,
    interaction_video: np.ndarray | None = None,
) -> pa.Table:
    """Fill the candidate lists of video-task rows under every protocol of VIDEO_PROTOCOLS, each with up to
    num_negatives distinct videos published strictly before ts, never the target (fewer only when fewer such
    videos exist), sampled with a generator seeded by (seed, protocol, event_id); `negatives` is the one of
    `protocol`.

    - uniform_all: uniform over every video published before ts;
    - alive_window: uniform over the videos alive at ts (alive_bounds: published within window_ms before ts,
      or within the event's own window when window_ms is 0);
    - popularity_at_t: in proportion to the positive interactions (interaction_ts / interaction_video, the
      used positive video events) strictly before ts; videos without any only fill up the list, uniformly.

    `video_ts` is videos.parquet's ts column (non-decreasing, so the eligible videos are an index range).
    """
    if protocol not in VIDEO_PROTOCOLS:
        raise ValueError(f"unknown video protocol {protocol!r}; expected one of {VIDEO_PROTOCOLS}")
    if interaction_ts is None:
        interaction_ts, interaction_video = np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(interaction_ts, kind="stable")
    inter_ts, inter_video = np.asarray(interaction_ts)[order], np.asarray(interaction_video)[order]

    ts = batch["ts"].to_numpy()
    lo, hi = alive_bounds(video_ts, ts, num_negatives, window_ms)
    targets = batch["target"].to_numpy()
    event_ids = batch["event_id"].to_pylist()
    lists: dict[str, list[np.ndarray]] = {p: [None] * len(batch) for p in VIDEO_PROTOCOLS}
    # Rows in time order, so the interaction counts before ts grow with one pass over the interactions.
    counts = np.zeros(len(video_ts), np.int64)
    seen = 0
    for i in np.argsort(ts, kind="stable").tolist():
        event_id, a, b, target = event_ids[i], int(lo[i]), int(hi[i]), int(targets[i])
        rng = np.random.default_rng(stable_seed(seed, "video", event_id))
        lists["uniform_all"][i] = sample_excluding(rng, 0, b, target, num_negatives)
        rng = np.random.default_rng(stable_seed(seed, "video", event_id))  # same draws: windows agree when equal
        lists["alive_window"][i] = sample_excluding(rng, a, b, target, num_negatives)
        now = int(np.searchsorted(inter_ts, ts[i], side="left"))
        np.add.at(counts, inter_video[seen:now], 1)
        seen = now
        rng = np.random.default_rng(stable_seed(seed, "video/popularity_at_t", event_id))
        lists["popularity_at_t"][i] = _sample_weighted(rng, counts[:b], target, num_negatives)
    for p in VIDEO_PROTOCOLS:
        column = _list_of_arrays(lists[p])
        batch = _set_or_append(batch, f"negatives_{p}", column)
    return _set_or_append(batch, "negatives", batch[f"negatives_{protocol}"])


def _list_of_arrays(rows: list[np.ndarray]) -> pa.ListArray:
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(x) for x in rows], out=offsets[1:])
    flat = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
    return list_array(offsets.astype(np.int32), flat, pa.int32())


def _set_or_append(table: pa.Table, name: str, column) -> pa.Table:
    index = table.schema.get_field_index(name)
    if index < 0:
        return table.append_column(name, column)
    return table.set_column(index, name, column)

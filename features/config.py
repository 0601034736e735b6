"""FeaturesConfig: the settings of `lsvcr features build` (features/build.py), checked in __post_init__; every
problem is a ConfigError naming the key (core/config.py)."""

from __future__ import annotations

from dataclasses import dataclass

from core import storage
from core.config import ConfigError, require, require_at_least
from core.contract import VIDEO_PROTOCOLS
from features.embeddings import check_encoder_name
from features.stage_b import SPLIT_POLICIES
from ingestion.schema import COMMENT_ACTIONS, POSITIVE_COMMENT_ACTIONS, POSITIVE_VIDEO_ACTIONS, VIDEO_ACTIONS

# Config fields that change rows: a state built with other values cannot be extended.
ROW_FIELDS = ("max_history", "num_negatives", "seed", "video_protocol", "negative_window_ms", "positive_video_actions",
              "positive_comment_actions", "split", "split_valid_ts", "split_test_ts", "lateness_ms")


@dataclass
class FeaturesConfig:
    eventlog: str  # a folder or a URI (s3://bucket/eventlog)
    out: str  # a folder or a URI: built in a local staging folder, then uploaded (features/build.py)
    max_history: int = 50
    num_negatives: int = 99
    seed: int = 0
    # Video-task candidate protocol of the `negatives` column (VIDEO_PROTOCOLS); every protocol's list is
    # written too (negatives_<protocol>), so evaluation can report several from one build.
    video_protocol: str = "alive_window"
    # W of alive_window: negatives published in [ts - W, ts). 0: decided per event, the smallest window that
    # holds num_negatives + 1 videos published before it (negatives.alive_bounds).
    negative_window_ms: int = 0
    positive_video_actions: tuple[str, ...] = tuple(sorted(POSITIVE_VIDEO_ACTIONS))
    positive_comment_actions: tuple[str, ...] = tuple(sorted(POSITIVE_COMMENT_ACTIONS))
    encoder: str = "minilm"
    encoder_dim: int = 64  # only for encoders whose size is free (hash)
    embed_batch_size: int = 256
    embed_concurrency: int = 1
    embed_device: str = "cpu"
    embed_threads: int = 0  # torch threads per encoder actor; 0: the machine's cores / embed_concurrency
    shuffle_partitions: int = 0  # stage partitions (tasks per stage); 0: from the number of rows and CPUs
    # Small builds skip Ray Data: a build reading at most `local_max_events` event rows runs its stages in this
    # process, and at most `embed_local_texts` texts missing from the cache are embedded here. On 2 cores Ray
    # Data costs 5-25 s a stage however little it reads, most of a small incremental build (the continuous
    # job's: issue 19). The same batch functions run either way, so the rows are the same. 0: always Ray.
    local_max_events: int = 20_000
    embed_local_texts: int = 2_000
    # Run every task on the driver's node: for an event log or out folder that only this node has (the
    # continuous job's). Always so when out is a URI, since the build then writes to a local staging folder.
    on_driver_node: bool = False
    # Embedding cache by content hash, per encoder (a local folder: each node keeps its own);
    # "" = <lsvcr cache dir>/embeddings, "off" = no cache.
    embed_cache: str = ""
    # Splits: "global_time" (one time cut for every user and both tasks: nothing a model learns from comes
    # from the evaluation period) or "leave_last_out" (one cut per user, shared by both tasks). The global cut
    # is split_valid_ts / split_test_ts when both are > 0, else the quantiles split_valid_frac /
    # split_test_frac of the used positive events' times.
    split: str = "global_time"
    split_valid_frac: float = 0.1
    split_test_frac: float = 0.1
    split_valid_ts: int = 0
    split_test_ts: int = 0
    # Watermark: events later than (latest event ts - lateness_ms) wait for the next build.
    lateness_ms: int = 0
    incremental: bool = False

    def __post_init__(self):
        require(self, bool(self.eventlog), "eventlog", "is required")
        require(self, bool(self.out), "out", "is required")
        require(self, not _same_location(self.eventlog, self.out), "out", "must differ from eventlog")
        require(self, self.embed_cache in ("", "off") or storage.is_local(self.embed_cache), "embed_cache",
                "must be a local folder, not a URI (the embedding cache is read and written row by row on the driver)")
        require_at_least(self, 1, "max_history", "embed_batch_size", "embed_concurrency", "encoder_dim")
        require_at_least(self, 0, "num_negatives", "negative_window_ms", "embed_threads", "shuffle_partitions",
                         "local_max_events", "embed_local_texts", "lateness_ms", "split_valid_ts", "split_test_ts")
        self.positive_video_actions = tuple(self.positive_video_actions)
        self.positive_comment_actions = tuple(self.positive_comment_actions)
        for key, known in (("positive_video_actions", VIDEO_ACTIONS), ("positive_comment_actions", COMMENT_ACTIONS)):
            actions = getattr(self, key)
            require(self, bool(actions) and set(actions) <= set(known), key,
                    f"must be a non-empty subset of {sorted(known)}")
        try:
            check_encoder_name(self.encoder)
        except ValueError as err:
            raise ConfigError(f"FeaturesConfig.encoder: {err}") from None
        require(self, self.split in SPLIT_POLICIES, "split", f"must be one of {SPLIT_POLICIES}")
        require_at_least(self, 0, "split_valid_frac", "split_test_frac")
        require(self, self.split_valid_frac + self.split_test_frac < 1, "split_test_frac",
                f"+ split_valid_frac ({self.split_valid_frac}) must be < 1")
        require(self, self.split_valid_ts <= self.split_test_ts, "split_valid_ts",
                f"must be <= split_test_ts ({self.split_test_ts})")
        # Leave-last-out and quantile cuts move as data arrives, which would change rows already written.
        require(self, not self.incremental or (self.split == "global_time" and self.split_test_ts > 0), "incremental",
                "needs split=global_time with split_valid_ts and split_test_ts set")
        require(self, self.video_protocol in VIDEO_PROTOCOLS, "video_protocol", f"must be one of {VIDEO_PROTOCOLS}")
        # Per-event windows move when late-published videos arrive, which would change rows already written.
        require(self, not self.incremental or self.negative_window_ms > 0, "negative_window_ms",
                "must be > 0 (a fixed alive window) for incremental=true")
        require(self, self.embed_device == "cpu" or self.embed_device.startswith("cuda"), "embed_device",
                "must be cpu or cuda[:n]")


def _same_location(a: str, b: str) -> bool:
    if storage.is_local(a) and storage.is_local(b):
        return storage.local_path(a).resolve() == storage.local_path(b).resolve()
    return str(a).rstrip("/") == str(b).rstrip("/")

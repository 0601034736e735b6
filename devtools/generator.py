"""Synthetic dataset generator: the four JSON Lines files of the data contract (DESIGN.md section 4).

The data is built so that text, sequence and the cross signal between videos and comments all matter:

- 12 topics, each with its own vocabulary; titles and tags are templates filled with the topic's words, so
  titles of one topic share words and a sentence encoder separates topics. Each title has a subject (a noun).
- 6 comment styles with recognisable phrasing; a comment mixes its style's phrasing with its video's topic words.
- Users have a sparse topic taste that drifts from a start mixture to an end mixture over the time span, a few
  favourite subjects per topic, and a comment-style taste that follows their topics (each topic has two
  preferred styles) plus personal noise. Video choice: the current topics (often the previous positive event's
  topic, often a favourite subject), among recently published videos, weighted by heavy-tailed quality and
  freshness. Comment choice: style match first, a favourite subject next, quality last. So popularity is a weak
  ranker, while a model that reads the text of a user's video and comment histories is a strong one.
- Users also have a personal taste for fresh videos (mean strength `freshness_taste`): some choices go to the
  videos of the chosen topic published in the last day. Recency then matters, as in a real feed, but less than taste.
- A freshness-dominated feed, as on real forums where sorting by date is a strong ranker, is off by default and
  named in configs/generate-freshness.yaml: fresh choices watched when a notification came, soon after the
  video's publication (`notify_minutes`), publication in bursts with quiet days (`quiet_days`), and likes and
  replies that go mostly to recent comments (`comment_recency_hours`).
- Videos are published before and during the stream (cold-start items); background comments keep appearing
  after each video's publication; users open a comment section right after watching the video, like or reply
  to comments already published there (background or other users'), and write comments of their own.

Streaming: the catalog (videos, background comments) is built in memory. Users are simulated in chunks, each
from its own RNG seeded by (seed, user index), in two passes: the first collects the comments users write, the
second replays the same users and writes their events, each chunk sorted into temporary files that are then
merged into the final files, all in (ts, id) order. The output depends on the config only, not on the chunk
size: same config, same bytes. With `write_truth`, truth/*.jsonl also holds each video's topic and subject,
each comment's style and subject, and each user's tastes (for checks; not part of the contract).
"""

from __future__ import annotations

import heapq
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingestion.schema import MAX_TS_MS, MIN_TS_MS, TABLES, to_json_line

DAY_MS = 86_400_000
SECOND_MS = 1000


@dataclass(frozen=True)
class Topic:
    name: str
    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    verbs: tuple[str, ...]
    people: tuple[str, ...]
    places: tuple[str, ...]
    tags: tuple[str, ...]
    styles: tuple[str, str]  # the two comment styles this topic's audience prefers


def _load_vocabulary(path: Path = Path(__file__).with_name("vocabulary.json")):
    """Topics, comment styles and text templates (a data file: the generator is the code, this is its words)."""
    data = json.loads(path.read_text())
    topics = tuple(Topic(**{k: tuple(v) if isinstance(v, list) else v for k, v in t.items()}) for t in data["topics"])
    templates = {style: tuple(lines) for style, lines in data["comment_templates"].items()}
    return tuple(data["styles"]), topics, tuple(data["title_templates"]), templates


STYLES, TOPICS, TITLE_TEMPLATES, COMMENT_TEMPLATES = _load_vocabulary()

# Each topic's audience: 0.35 on each of its two styles, the rest spread evenly (sums to 1).
TOPIC_STYLE = np.full((len(TOPICS), len(STYLES)), 0.3 / (len(STYLES) - 2))
for _k, _topic in enumerate(TOPICS):
    for _style in _topic.styles:
        TOPIC_STYLE[_k, STYLES.index(_style)] = 0.35


@dataclass
class GeneratorConfig:
    users: int = 1000
    seed: int = 0
    days: float = 30.0  # length of the event stream
    events_per_user: float = 10.0  # mean video events per user (activity is heavy-tailed)
    videos_per_user: float = 0.1  # catalog size scales with the user count ...
    min_videos: int = 200  # ... but never below this
    comments_per_video: float = 15.0  # mean background comments per video (more on better videos)
    start_ms: int = 1_700_000_000_000  # first possible event time
    prelaunch_days: float = 7.0  # videos published before the stream start are spread over this window
    prelaunch_fraction: float = 0.3  # share of videos published before the stream starts; the rest are cold starts
    alive_days: float = 14.0  # users pick among videos published within this window
    freshness_days: float = 3.0  # time scale of the freshness decay in video choice
    # Users' taste for fresh items: a user's video choice goes, with a personal probability of mean
    # `freshness_taste` (0: never), to a video of the chosen topic published within the last `fresh_hours`
    # (the newest one of the topic when there is none).
    freshness_taste: float = 0.3
    fresh_hours: float = 24.0
    # Users who follow their topics (0: off): a fresh choice (picked as above) is watched about this many
    # minutes (exponential mean) after the video's publication, when a notification would bring the user, not
    # at the session's time. The newest video is then very often the one watched, as on a forum sorted by date.
    notify_minutes: float = 0.0
    # Bursty publication (0: uniform over time): this share of the days is quiet, with a tenth of a busy day's
    # publication rate (_QUIET_RATE), the quiet days drawn at random.
    quiet_days: float = 0.0
    # Engagement with recent comments (0: off): the pick of a comment to like or reply to is also weighted by
    # exp(-age / comment_recency_hours), its age when the section is opened.
    comment_recency_hours: float = 0.0
    comment_delay_days: float = 2.0  # mean delay between a video's publication and a background comment
    stickiness: float = 0.4  # probability that a video has the topic of the user's previous positive one
    explore: float = 0.08  # probability of a video from a random topic
    comment_visit_prob: float = 0.3  # probability that a positive video event opens the comment section
    reply_prob: float = 0.2  # share of interactions with an existing comment that are replies (rest: likes)
    write_prob: float = 0.15  # probability that a comment-section visit also writes a new comment
    style_topic_weight: float = 0.35  # share of a user's comment-style taste that follows their topics
    style_weight: float = 4.0  # exponent on the user's style taste when choosing a comment (the main driver)
    subject_focus: float = 0.5  # probability that a video is about one of the user's favourite subjects
    subject_boost: float = 4.0  # weight of a comment that mentions one of the user's favourite subjects
    quality_weight: float = 0.5  # exponent on a comment's quality when choosing it (secondary)
    chunk_users: int = 5000  # users generated in memory at once
    write_truth: bool = False  # also write truth/*.jsonl (topics, styles, tastes) for checks; not contract data

    def __post_init__(self):
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"GeneratorConfig: {message}")

        check(self.users >= 1, f"users must be >= 1, got {self.users}")
        check(self.days > 0, f"days must be > 0, got {self.days}")
        check(self.events_per_user > 0, f"events_per_user must be > 0, got {self.events_per_user}")
        check(self.videos_per_user >= 0, f"videos_per_user must be >= 0, got {self.videos_per_user}")
        check(self.min_videos >= len(TOPICS), f"min_videos must be >= {len(TOPICS)} (one per topic)")
        check(self.comments_per_video >= 0, f"comments_per_video must be >= 0, got {self.comments_per_video}")
        for name in ("prelaunch_days", "alive_days", "freshness_days", "comment_delay_days"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("prelaunch_fraction", "style_topic_weight", "subject_focus", "stickiness", "explore",
                     "comment_visit_prob", "reply_prob", "write_prob", "freshness_taste", "quiet_days"):
            check(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1], got {getattr(self, name)}")
        check(self.style_weight >= 0 and self.quality_weight >= 0, "style_weight and quality_weight must be >= 0")
        check(self.subject_boost >= 1, f"subject_boost must be >= 1, got {self.subject_boost}")
        check(self.chunk_users >= 1, f"chunk_users must be >= 1, got {self.chunk_users}")
        check(self.fresh_hours > 0, f"fresh_hours must be > 0, got {self.fresh_hours}")
        for name in ("notify_minutes", "comment_recency_hours"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0 (0: off), got {getattr(self, name)}")
        first = self.start_ms - int(self.prelaunch_days * DAY_MS)
        last = self.start_ms + int(self.days * DAY_MS)
        check(MIN_TS_MS <= first and last < MAX_TS_MS,
              "start_ms, prelaunch_days and days must keep all times within years 2000-2100")
        # Freshness weights are exp(age / freshness_days) relative to the oldest video; keep them finite.
        check((self.days + self.prelaunch_days) / self.freshness_days <= 600,
              "(days + prelaunch_days) / freshness_days must be <= 600")

    @property
    def end_ms(self) -> int:
        return self.start_ms + int(self.days * DAY_MS)

    @property
    def num_videos(self) -> int:
        return max(self.min_videos, int(round(self.users * self.videos_per_user)))


# ----------------------------------------------------------------------------------------------------------
# Text


def _fill(template: str, topic: Topic, rng: np.random.Generator, noun: int | None = None) -> tuple[str, int]:
    """Fill a template with the topic's words; returns the text and the subject (noun index) it names, or -1."""
    r = rng.integers(0, 1 << 30, size=9)
    nouns = topic.nouns
    i = int(r[0] % len(nouns)) if noun is None else noun
    noun2 = nouns[(i + 1 + r[1] % (len(nouns) - 1)) % len(nouns)]  # never the same as the subject
    adj = topic.adjectives[r[2] % len(topic.adjectives)]
    person = topic.people[r[4] % len(topic.people)]
    text = template.format(
        noun=nouns[i], Noun=nouns[i].capitalize(), noun2=noun2, adj=adj, Adj=adj.capitalize(),
        verb=topic.verbs[r[3] % len(topic.verbs)], person=person, Person=person.capitalize(),
        place=topic.places[r[5] % len(topic.places)], n=(3, 5, 7, 10, 15, 30)[r[6] % 6],
        ss=f"{r[7] % 60:02d}", year=1995 + r[8] % 25,
    )
    return text, (i if "{noun}" in template or "{Noun}" in template else -1)


def video_title(topic: Topic, rng: np.random.Generator) -> tuple[str, int]:
    title, subject = _fill(TITLE_TEMPLATES[rng.integers(len(TITLE_TEMPLATES))], topic, rng)
    if rng.random() < 0.2:
        title += f" (part {rng.integers(2, 9)})"
    return title, subject


def video_tags(topic: Topic, rng: np.random.Generator) -> list[str]:
    count = int(rng.choice(5, p=[0.05, 0.15, 0.35, 0.3, 0.15]))
    return [topic.tags[i] for i in sorted(rng.choice(len(topic.tags), size=count, replace=False))]


def comment_text(topic: Topic, style: int, rng: np.random.Generator, noun: int | None = None) -> tuple[str, int]:
    templates = COMMENT_TEMPLATES[STYLES[style]]
    return _fill(templates[rng.integers(len(templates))], topic, rng, noun)


# ----------------------------------------------------------------------------------------------------------
# Catalog: videos and background comments, in memory


@dataclass
class _Pool:
    """Videos to choose from, in publication order, with cumulative quality x exp(pub / freshness) weights.

    Freshness exp(-(t - pub) / tau) = exp(pub / tau) x exp(-t / tau): the factor in t is common to all videos,
    so a choice among the videos published in [t - alive, t) is one bisection in the cumulative weights.
    """

    videos: np.ndarray
    pub: np.ndarray
    cum: np.ndarray

    def pick(self, t: int, alive_ms: int, u: float) -> int:
        """A video published before t, preferring the recent ones; -1 when there is none."""
        hi = int(self.pub.searchsorted(t, side="left"))
        if hi == 0:
            return -1
        lo = int(self.pub.searchsorted(t - alive_ms, side="left"))
        if lo >= hi:
            lo = 0  # nothing recent: fall back to older videos
        return self._pick_between(lo, hi, u)

    def pick_fresh(self, t: int, window_ms: int, u: float) -> int:
        """A video published in [t - window, t), by weight, else the newest before t; -1 when there is none."""
        hi = int(self.pub.searchsorted(t, side="left"))
        if hi == 0:
            return -1
        lo = min(int(self.pub.searchsorted(t - window_ms, side="left")), hi - 1)
        return self._pick_between(lo, hi, u)

    def _pick_between(self, lo: int, hi: int, u: float) -> int:
        base = float(self.cum[lo - 1]) if lo > 0 else 0.0
        j = int(self.cum.searchsorted(base + u * (float(self.cum[hi - 1]) - base), side="right"))
        return int(self.videos[min(max(j, lo), hi - 1)])


@dataclass
class _Catalog:
    video_ids: list[str]
    video_topic: np.ndarray  # [V] int
    video_subject: np.ndarray  # [V] int, noun index of the title's subject in its topic
    video_quality: np.ndarray  # [V] float, lognormal
    video_duration: np.ndarray  # [V] int64 ms
    video_pub: np.ndarray  # [V] int64 ms, publication time
    topic_pools: list[_Pool]  # per topic
    subject_pools: dict[tuple[int, int], _Pool]  # per (topic, subject)


@dataclass
class _Comments:
    """Comment attributes the simulation needs, one row per comment (background first, then users')."""

    video: list[int]
    ts: list[int]
    style: list[int]
    subject: list[int]  # noun index named by the text, -1 for none
    quality: list[float]
    author: list[int]  # simulated user index, -1 for background authors


@dataclass
class _Sections:
    """Every comment grouped by video, each group in time order: what a user sees in a comment section."""

    offsets: np.ndarray  # [V + 1] slices of the arrays below
    comment: np.ndarray  # comment index (row of _Comments, and number in its id)
    ts: np.ndarray
    style: np.ndarray
    subject: np.ndarray
    quality_pow: np.ndarray  # quality ** quality_weight
    author: np.ndarray

    @classmethod
    def build(cls, comments: _Comments, num_videos: int, quality_weight: float) -> "_Sections":
        video = np.asarray(comments.video, dtype=np.int64)
        ts = np.asarray(comments.ts, dtype=np.int64)
        order = np.lexsort((np.arange(len(ts)), ts, video))
        return cls(
            offsets=np.searchsorted(video[order], np.arange(num_videos + 1)), comment=order, ts=ts[order],
            style=np.asarray(comments.style, dtype=np.int64)[order],
            subject=np.asarray(comments.subject, dtype=np.int64)[order],
            quality_pow=np.asarray(comments.quality, dtype=np.float64)[order] ** quality_weight,
            author=np.asarray(comments.author, dtype=np.int64)[order],
        )


def _prefixed(ts: int, row_id: str, record: dict) -> str:
    # Fixed-width ts then the id: plain string order of these lines is the (ts, id) order of the records.
    return f"{ts:015d}\t{row_id}\t{to_json_line(record)}\n"


_QUIET_RATE = 0.1  # a quiet day's publication rate relative to a busy day's


def _bursty(u: np.ndarray, days: float, quiet_days: float, rng: np.random.Generator) -> np.ndarray:
    """Uniform draws in [0, 1) -> positions in [0, 1) of a span of `days` days, where a random `quiet_days`
    share of the days gets _QUIET_RATE of a busy day's density (inverse CDF of the piecewise-constant density)."""
    n_days = max(1, math.ceil(days))
    length = np.minimum(1.0, days - np.arange(n_days))  # [D] the last day may be partial
    mass = np.where(rng.random(n_days) < quiet_days, _QUIET_RATE, 1.0) * length
    cum = np.concatenate([[0.0], np.cumsum(mass)]) / mass.sum()  # [D + 1]
    day = np.clip(np.searchsorted(cum, u, side="right") - 1, 0, n_days - 1)
    inside = (u - cum[day]) / (cum[day + 1] - cum[day])
    return np.minimum((day + inside * length[day]) / days, np.nextafter(1.0, 0.0))


def _build_catalog(config: GeneratorConfig) -> tuple[_Catalog, _Comments, list[str], list[str], dict]:
    """Draw videos and background comments; return them with their prefixed lines and their truth."""
    rng = np.random.default_rng([config.seed, 1])
    n, k = config.num_videos, len(TOPICS)
    start, end = config.start_ms, config.end_ms
    topic = rng.integers(k, size=n)
    topic[:k] = np.arange(k)
    prelaunch = rng.random(n) < config.prelaunch_fraction
    prelaunch[:k] = True  # every topic has a video before the first event, so a choice never comes up empty
    before, during = rng.random(n), rng.random(n)  # positions in the prelaunch window and in the stream
    if config.quiet_days > 0:
        # Its own RNG: the default dataset (quiet_days 0) keeps every draw it had.
        burst_rng = np.random.default_rng([config.seed, 4])
        before = _bursty(before, config.prelaunch_days, config.quiet_days, burst_rng)
        during = _bursty(during, config.days, config.quiet_days, burst_rng)
    pub = np.where(
        prelaunch,
        start - 1 - (before * config.prelaunch_days * DAY_MS).astype(np.int64),
        start + (during * config.days * DAY_MS).astype(np.int64),
    )
    quality = rng.lognormal(0.0, 1.0, size=n)
    duration = np.clip(rng.lognormal(math.log(25_000), 0.6, size=n), 5_000, 180_000).astype(np.int64)
    # Creators specialise in one topic; their ids continue after the simulated users' ids.
    per_topic = max(1, n // (8 * k))
    creator = topic * per_topic + rng.integers(per_topic, size=n)
    titled = [video_title(TOPICS[t], rng) for t in topic]
    tags = [video_tags(TOPICS[t], rng) for t in topic]

    # Renumber videos in publication order, so ids grow with time.
    order = np.lexsort((np.arange(n), pub))
    topic, pub, quality, duration, creator = topic[order], pub[order], quality[order], duration[order], creator[order]
    titled = [titled[i] for i in order]
    tags = [tags[i] for i in order]
    subject = np.array([s for _, s in titled], dtype=np.int64)
    video_ids = [f"v{i:07d}" for i in range(n)]
    video_lines = [
        _prefixed(int(pub[i]), video_ids[i], {
            "video_id": video_ids[i], "title": titled[i][0], "tags": tags[i],
            "author_id": f"u{config.users + int(creator[i]):06d}", "ts": int(pub[i]),
        })
        for i in range(n)
    ]
    truth = {"videos": [{"video_id": video_ids[i], "topic": TOPICS[topic[i]].name,
                         "subject": TOPICS[topic[i]].nouns[subject[i]], "quality": round(float(quality[i]), 4)}
                        for i in range(n)]}
    origin = start - config.prelaunch_days * DAY_MS
    weight = quality * np.exp((pub - origin) / (config.freshness_days * DAY_MS))

    def pool(members: np.ndarray) -> _Pool:
        return _Pool(videos=members, pub=pub[members], cum=np.cumsum(weight[members]))

    topic_pools = [pool(np.flatnonzero(topic == t)) for t in range(k)]
    subject_pools = {}
    for t in range(k):
        for s in range(len(TOPICS[t].nouns)):
            members = np.flatnonzero((topic == t) & (subject == s))
            if len(members):
                subject_pools[(t, s)] = pool(members)
    catalog = _Catalog(video_ids=video_ids, video_topic=topic, video_subject=subject, video_quality=quality,
                       video_duration=duration, video_pub=pub, topic_pools=topic_pools, subject_pools=subject_pools)

    # Background comments: more on better videos, published after the video, until the stream ends.
    commenter_base = config.users + k * per_topic
    commenters = max(50, config.users)
    counts = rng.poisson(config.comments_per_video * quality / quality.mean())
    counts = np.minimum(counts, int(30 * config.comments_per_video) + 1)
    c_video_parts, c_ts_parts, c_parent_parts = [], [], []
    first = 0  # index of the video's first comment
    for v in range(n):
        delays = rng.exponential(config.comment_delay_days * DAY_MS, size=counts[v]).astype(np.int64)
        ts = np.sort(pub[v] + 10 * SECOND_MS + delays)
        ts = ts[ts < end]
        # About one in five replies to a comment published before it under the same video.
        earlier = np.searchsorted(ts, ts, side="left")  # [n_v] how many are strictly older
        is_reply = (earlier > 0) & (rng.random(len(ts)) < 0.2)
        parent = first + (rng.random(len(ts)) * earlier).astype(np.int64)
        c_parent_parts.append(np.where(is_reply, parent, -1))
        c_video_parts.append(np.full(len(ts), v, dtype=np.int64))
        c_ts_parts.append(ts)
        first += len(ts)
    c_video_arr = np.concatenate(c_video_parts)
    c_ts_arr = np.concatenate(c_ts_parts)
    c_parent = np.concatenate(c_parent_parts).tolist()
    c_ts = c_ts_arr.tolist()
    m = len(c_ts)
    style_mix = 0.5 * TOPIC_STYLE + 0.5 / len(STYLES)  # sections mix all styles, leaning to the topic's audience
    style_cum = np.cumsum(style_mix, axis=1)  # [K, S]
    c_style = np.minimum((rng.random((m, 1)) > style_cum[topic[c_video_arr]]).sum(axis=1), len(STYLES) - 1)
    c_quality = rng.lognormal(0.0, 1.0, size=m)
    c_author = commenter_base + rng.integers(commenters, size=m)
    on_subject = rng.random(m) < 0.3  # some comments talk about the video's own subject
    c_texted = [comment_text(TOPICS[topic[v]], int(s), rng, int(subject[v]) if same else None)
                for v, s, same in zip(c_video_arr, c_style, on_subject)]

    # Renumber comments in time order; parents keep pointing at the same comment.
    order = np.lexsort((np.arange(m), c_ts_arr))
    new_index = np.empty(m, dtype=np.int64)
    new_index[order] = np.arange(m)
    comments = _Comments(video=[], ts=[], style=[], subject=[], quality=[], author=[])
    comment_lines = []
    truth["comments"] = []
    for i, old in enumerate(order):
        parent, v, noun = c_parent[old], int(c_video_arr[old]), c_texted[old][1]
        comment_id = f"c{i:08d}"
        comment_lines.append(_prefixed(c_ts[old], comment_id, {
            "comment_id": comment_id, "video_id": video_ids[v], "author_id": f"u{int(c_author[old]):06d}",
            "text": c_texted[old][0], "parent_id": f"c{new_index[parent]:08d}" if parent >= 0 else None,
            "ts": c_ts[old],
        }))
        comments.video.append(v)
        comments.ts.append(c_ts[old])
        comments.style.append(int(c_style[old]))
        comments.subject.append(noun)
        comments.quality.append(float(c_quality[old]))
        comments.author.append(-1)
        truth["comments"].append({
            "comment_id": comment_id, "style": STYLES[c_style[old]],
            "subject": TOPICS[topic[v]].nouns[noun] if noun >= 0 else None, "quality": round(float(c_quality[old]), 4),
        })
    return catalog, comments, video_lines, comment_lines, truth


# ----------------------------------------------------------------------------------------------------------
# Users
#
# Each user is simulated twice from the same RNG, so the result depends on (seed, user index) only. The first
# pass plans the timeline and the comments users write; once every user's comments are known, the second pass
# replays the plan and picks, with a second RNG, the comments each user likes or replies to, among all comments
# (background or other users') published before the visit.


def _sparse_taste(rng: np.random.Generator, k: int) -> np.ndarray:
    """1-3 dominant topics holding 90% of the mass, a thin sparse background for the rest."""
    dominant = rng.choice(k, size=1 + int(np.searchsorted([0.4, 0.75], rng.random())), replace=False)
    taste = 0.1 * rng.dirichlet(np.full(k, 0.3))
    taste[dominant] += 0.9 * rng.dirichlet(np.full(len(dominant), 2.0))
    return taste


@dataclass
class _Written:
    """A comment the user writes: top level, or a reply once its parent is picked."""

    ts: int
    text: str
    style: int
    subject: int
    quality: float


@dataclass
class _Visit:
    video: int
    opened: int  # comments published before this time are visible
    style: np.ndarray  # [S] the user's style taste at the time
    slots: list[tuple[int, _Written | None]]  # (ts, None for a like or the reply's text)
    write: _Written | None


@dataclass
class _Plan:
    index: int
    user_id: str
    subjects: np.ndarray  # [K, 3] favourite noun indices per topic
    video_events: list[tuple[int, int, str, int | None]]  # (ts, video, action, watch_ms)
    visits: list[_Visit]
    truth: dict


_POSITIVE_ACTIONS = ("finish", "like", "share", "comment")
_POSITIVE_ACTION_CUM = np.cumsum([0.45, 0.32, 0.13, 0.1])
_FAVOURITES = 3


def _write_comment(rng: np.random.Generator, topic: int, style: np.ndarray, subjects: np.ndarray,
                   ts: int) -> _Written:
    """A comment in the user's style, often about one of their favourite subjects."""
    s = min(int(np.searchsorted(np.cumsum(style), rng.random() * style.sum(), side="right")), len(STYLES) - 1)
    noun = int(subjects[topic, rng.integers(_FAVOURITES)]) if rng.random() < 0.6 else None
    text, subject = comment_text(TOPICS[topic], s, rng, noun)
    return _Written(ts=ts, text=text, style=s, subject=subject, quality=float(rng.lognormal(0.0, 1.0)))


def _plan_user(index: int, catalog: _Catalog, config: GeneratorConfig) -> _Plan:
    """One user's video events and comment-section visits; a function of (seed, index) and the catalog only."""
    rng = np.random.default_rng([config.seed, 2, index])
    k = len(TOPICS)
    taste_start = _sparse_taste(rng, k)
    taste_end = 0.4 * taste_start + 0.6 * _sparse_taste(rng, k)  # drift, keeping part of the old taste
    style_personal = rng.dirichlet(np.full(len(STYLES), 0.5))
    # Personal taste for fresh videos: between 0 and twice the configured mean, never above 1.
    fresh_prob = min(1.0, config.freshness_taste * 2.0 * float(rng.beta(2.0, 2.0)))
    keys = rng.random((k, max(len(t.nouns) for t in TOPICS)))
    for t, topic_def in enumerate(TOPICS):
        keys[t, len(topic_def.nouns):] = 2.0  # past the end of this topic's nouns: never a favourite
    subjects = np.argsort(keys, axis=1)[:, :_FAVOURITES]
    user_id = f"u{index:06d}"
    plan = _Plan(index, user_id, subjects, [], [], truth={
        "user_id": user_id, "taste_start": np.round(taste_start, 4).tolist(),
        "taste_end": np.round(taste_end, 4).tolist(), "style_personal": np.round(style_personal, 4).tolist(),
        "fresh_prob": round(fresh_prob, 4),
        "subjects": {t.name: [t.nouns[s] for s in subjects[i]] for i, t in enumerate(TOPICS)},
    })

    start, end = config.start_ms, config.end_ms
    span = end - start
    alive_ms = int(config.alive_days * DAY_MS)
    fresh_ms = int(config.fresh_hours * 3_600_000)
    margin = 3_600_000  # sessions start at least an hour before the end
    n_events = int(np.clip(round(config.events_per_user * rng.lognormal(-0.32, 0.8)), 1,
                           50 * config.events_per_user))
    # Sessions of about four videos each, at random times; inside a session events follow each other.
    n_sessions = 1 + int(rng.binomial(n_events - 1, 0.25)) if n_events > 1 else 1
    session_first = set(rng.choice(np.arange(1, n_events), size=n_sessions - 1, replace=False).tolist()) | {0}
    session_starts = iter(np.sort(start + (rng.random(n_sessions) * max(span - margin, 1)).astype(np.int64)))
    # Per event: stickiness, explore, topic, focus, favourite, video x3, positive, action, watch, fresh.
    draws = rng.random((n_events, 12))
    seen: set[int] = set()
    prev_topic = -1
    clock = start
    for i in range(n_events):
        if i in session_first:
            clock = max(clock, int(next(session_starts)))
        if clock >= end - margin // 2:
            break
        t = clock
        mix = (t - start) / span
        taste = (1.0 - mix) * taste_start + mix * taste_end
        d = draws[i]
        if prev_topic >= 0 and d[0] < config.stickiness:
            topic = prev_topic
        elif d[1] < config.explore:
            topic = int(d[2] * k)
        else:
            cum = np.cumsum(taste)
            topic = min(int(cum.searchsorted(d[2] * cum[-1], side="right")), k - 1)
        pool = catalog.topic_pools[topic]
        if d[3] < config.subject_focus:
            pool = catalog.subject_pools.get((topic, int(subjects[topic, int(d[4] * _FAVOURITES)])), pool)
        # A fresh choice keeps the topic (taste still decides) but not the favourite subject, whose few videos
        # are rarely new.
        fresh = d[11] < fresh_prob
        if fresh:
            pool = catalog.topic_pools[topic]
        video = -1
        for attempt in range(3):  # avoid rewatching when another video is at hand
            if fresh:
                video = pool.pick_fresh(t, fresh_ms, d[5 + attempt])
            else:
                video = pool.pick(t, alive_ms, d[5 + attempt])
                if video < 0:
                    pool = catalog.topic_pools[topic]  # nothing out yet on the favourite subject
                    video = pool.pick(t, alive_ms, d[5 + attempt])
            if video not in seen:
                break
        seen.add(video)
        session_clock = clock
        notified = False
        if fresh and config.notify_minutes > 0:
            # Watched when the notification came, soon after publication, if that is inside the stream and
            # before the session's time; the session then goes on where it was (below). Not drawn when off: the
            # default dataset keeps every draw it had.
            notified_at = int(catalog.video_pub[video]) + max(
                SECOND_MS, int(rng.exponential(config.notify_minutes * 60_000)))
            if start <= notified_at < t:
                t, notified = notified_at, True
        favourite = catalog.video_subject[video] in subjects[topic]
        p_positive = (0.05 + 0.6 * taste[topic] / taste.max() + 0.1 * favourite
                      + 0.08 * math.log(float(catalog.video_quality[video])))
        positive = d[8] < min(max(p_positive, 0.05), 0.95)
        duration = int(catalog.video_duration[video])
        if positive:
            action = _POSITIVE_ACTIONS[min(int(_POSITIVE_ACTION_CUM.searchsorted(d[9], side="right")), 3)]
            prev_topic = topic
        else:
            action = "view"
        if action == "view":
            watch_ms = int(duration * (0.05 + 0.65 * d[10]))
        elif action == "finish":
            watch_ms = int(duration * (1.0 + 0.5 * d[10]))
        else:
            watch_ms = None  # like/share/comment are logged without a watch time
        plan.video_events.append((t, video, action, watch_ms))
        clock = t + (watch_ms if watch_ms is not None else duration) + int(rng.integers(1, 15)) * SECOND_MS

        visit_prob = config.comment_visit_prob if positive else config.comment_visit_prob / 5
        if action == "comment" or rng.random() < visit_prob:
            # The comment section opens after the video was watched.
            w = config.style_topic_weight
            style = w * (taste @ TOPIC_STYLE) + (1.0 - w) * style_personal  # [S]
            video_topic = int(catalog.video_topic[video])
            visit = _Visit(video, clock, style, [], None)
            for _ in range(min(1 + int(rng.poisson(0.8)), 3)):
                clock += int(rng.integers(3, 40)) * SECOND_MS
                reply = rng.random() < config.reply_prob
                visit.slots.append((clock, _write_comment(rng, video_topic, style, subjects, clock) if reply else None))
            if action == "comment" or rng.random() < config.write_prob:
                clock += int(rng.integers(5, 60)) * SECOND_MS
                visit.write = _write_comment(rng, video_topic, style, subjects, clock)
            plan.visits.append(visit)
        if notified:
            clock = session_clock
    return plan


def _written(plan: _Plan) -> list[tuple[int, _Written]]:
    """(video, comment) for the user's comments, in the order pass 2 numbers them."""
    out = []
    for visit in plan.visits:
        out.extend((visit.video, written) for _, written in visit.slots if written is not None)
        if visit.write is not None:
            out.append((visit.video, visit.write))
    return out


class _Writer:
    """Second pass: turns plans into prefixed lines, numbering events and user comments in user order."""

    def __init__(self, catalog: _Catalog, config: GeneratorConfig, sections: _Sections, first_user_comment: int,
                 truth: dict | None):
        self.catalog, self.config, self.sections, self.truth = catalog, config, sections, truth
        self.next_comment = first_user_comment
        self.video_events = 0
        self.comment_events = 0
        self.rows: dict[str, list[str]] = {"comments": [], "video_events": [], "comment_events": []}

    def user(self, plan: _Plan) -> None:
        catalog = self.catalog
        for ts, video, action, watch_ms in plan.video_events:
            event_id = f"ve{self.video_events:09d}"
            self.video_events += 1
            self.rows["video_events"].append(_prefixed(ts, event_id, {
                "event_id": event_id, "user_id": plan.user_id, "video_id": catalog.video_ids[video],
                "action": action, "watch_ms": watch_ms, "ts": ts,
            }))
        rng = np.random.default_rng([self.config.seed, 3, plan.index])
        for visit in plan.visits:
            targets = self._pick_targets(rng, plan, visit)
            for slot, (ts, reply) in enumerate(visit.slots):
                target = targets[slot] if slot < len(targets) else None
                if reply is None:
                    if target is not None:
                        self._event(plan.user_id, target, visit.video, "like", ts)
                else:
                    # A reply with nothing to reply to stays a top-level comment.
                    own = self._comment(plan, visit.video, reply, parent_id=target)
                    self._event(plan.user_id, target or own, visit.video, "reply" if target else "write", ts)
            if visit.write is not None:
                own = self._comment(plan, visit.video, visit.write, parent_id=None)
                self._event(plan.user_id, own, visit.video, "write", visit.write.ts)
        if self.truth is not None:
            self.truth["users"].append(plan.truth)

    def _pick_targets(self, rng: np.random.Generator, plan: _Plan, visit: _Visit) -> list[str]:
        """Comments to like or reply to: style match first, a favourite subject next, quality last."""
        sec = self.sections
        a, b = sec.offsets[visit.video], sec.offsets[visit.video + 1]
        visible = a + int(sec.ts[a:b].searchsorted(visit.opened, side="left"))  # published before opening
        topic = int(self.catalog.video_topic[visit.video])
        weights = (visit.style[sec.style[a:visible]] ** self.config.style_weight
                   * np.where(np.isin(sec.subject[a:visible], plan.subjects[topic]), self.config.subject_boost, 1.0)
                   * sec.quality_pow[a:visible]
                   * (sec.author[a:visible] != plan.index))  # never one's own comment
        if self.config.comment_recency_hours > 0:
            age_h = (visit.opened - sec.ts[a:visible]) / 3_600_000
            weights = weights * np.exp(-age_h / self.config.comment_recency_hours)
        wanted = min(len(visit.slots), int(np.count_nonzero(weights)))
        if wanted == 0:
            return []
        picks = rng.choice(visible - a, size=wanted, replace=False, p=weights / weights.sum())
        return [f"c{int(sec.comment[a + p]):08d}" for p in picks]

    def _comment(self, plan: _Plan, video: int, written: _Written, parent_id: str | None) -> str:
        comment_id = f"c{self.next_comment:08d}"
        self.next_comment += 1
        self.rows["comments"].append(_prefixed(written.ts, comment_id, {
            "comment_id": comment_id, "video_id": self.catalog.video_ids[video], "author_id": plan.user_id,
            "text": written.text, "parent_id": parent_id, "ts": written.ts,
        }))
        if self.truth is not None:
            topic = TOPICS[int(self.catalog.video_topic[video])]
            self.truth["comments"].append({
                "comment_id": comment_id, "style": STYLES[written.style],
                "subject": topic.nouns[written.subject] if written.subject >= 0 else None,
                "quality": round(written.quality, 4),
            })
        return comment_id

    def _event(self, user_id: str, comment_id: str, video: int, action: str, ts: int) -> None:
        event_id = f"ce{self.comment_events:09d}"
        self.comment_events += 1
        self.rows["comment_events"].append(_prefixed(ts, event_id, {
            "event_id": event_id, "user_id": user_id, "comment_id": comment_id,
            "video_id": self.catalog.video_ids[video], "action": action, "ts": ts,
        }))

    def flush(self) -> dict[str, list[str]]:
        rows, self.rows = self.rows, {"comments": [], "video_events": [], "comment_events": []}
        return rows


# ----------------------------------------------------------------------------------------------------------
# Files


def _merge(parts: list[Path], target: Path) -> int:
    """Merge sorted prefixed-line files into `target` (prefix stripped); returns the line count."""
    handles = [part.open("r", encoding="utf-8") for part in parts]
    count = 0
    try:
        with target.open("w", encoding="utf-8", newline="\n") as out:
            for line in heapq.merge(*handles):
                out.write(line.split("\t", 2)[2])
                count += 1
    finally:
        for handle in handles:
            handle.close()
    return count


def _write_sorted(lines: list[str], path: Path) -> None:
    lines.sort()
    with path.open("w", encoding="utf-8", newline="\n") as out:
        out.writelines(lines)


def generate(out_dir: str | Path, config: GeneratorConfig | None = None) -> dict:
    """Write videos.jsonl, comments.jsonl, video_events.jsonl and comment_events.jsonl into out_dir.

    Every file is in (ts, id) order. Returns the number of users and the record count per table.
    """
    config = config or GeneratorConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".generate-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    began = time.perf_counter()

    def progress(message: str) -> None:
        print(f"generate: {message} ({time.perf_counter() - began:.1f}s)", flush=True)

    catalog, comments, video_lines, comment_lines, catalog_truth = _build_catalog(config)
    _write_sorted(video_lines, tmp / "videos.part")
    _write_sorted(comment_lines, tmp / "comments-catalog.part")
    background = len(comment_lines)
    progress(f"catalog of {len(video_lines)} videos and {background} background comments")
    del video_lines, comment_lines

    # Pass 1: every user's own comments, so that pass 2 can show them to the others.
    n_chunks = (config.users + config.chunk_users - 1) // config.chunk_users
    for chunk in range(n_chunks):
        first, last = chunk * config.chunk_users, min(config.users, (chunk + 1) * config.chunk_users)
        for index in range(first, last):
            for video, written in _written(_plan_user(index, catalog, config)):
                comments.video.append(video)
                comments.ts.append(written.ts)
                comments.style.append(written.style)
                comments.subject.append(written.subject)
                comments.quality.append(written.quality)
                comments.author.append(index)
        progress(f"plan {chunk + 1}/{n_chunks}: users {first}-{last - 1}, {len(comments.ts) - background} "
                 "user comments")
    sections = _Sections.build(comments, len(catalog.video_ids), config.quality_weight)

    # Pass 2: the same plans again, written out chunk by chunk, each chunk sorted into its own part files.
    truth = None
    if config.write_truth:
        truth = {"videos": catalog_truth["videos"], "comments": catalog_truth["comments"], "users": []}
    writer = _Writer(catalog, config, sections, background, truth)
    parts = {"videos": [tmp / "videos.part"], "comments": [tmp / "comments-catalog.part"],
             "video_events": [], "comment_events": []}
    for chunk in range(n_chunks):
        first, last = chunk * config.chunk_users, min(config.users, (chunk + 1) * config.chunk_users)
        for index in range(first, last):
            writer.user(_plan_user(index, catalog, config))
        for table, lines in writer.flush().items():
            parts[table].append(tmp / f"{table}-{chunk:06d}.part")
            _write_sorted(lines, parts[table][-1])
        progress(f"write {chunk + 1}/{n_chunks}: users {first}-{last - 1}, {writer.video_events} video events, "
                 f"{writer.comment_events} comment events")

    counts = {"users": config.users}
    for table in TABLES:
        counts[table] = _merge(parts[table], out / f"{table}.jsonl")
    if truth is not None:
        (out / "truth").mkdir(exist_ok=True)
        for name, records in truth.items():
            with (out / "truth" / f"{name}.jsonl").open("w", encoding="utf-8", newline="\n") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in records)
    shutil.rmtree(tmp)
    progress(f"wrote {out}: " + ", ".join(f"{name} {count}" for name, count in counts.items()))
    return counts

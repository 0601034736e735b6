"""A features folder with other item tables: the same examples, catalogs and split, with video_emb and
comment_emb re-embedded by another encoder (for example `lora:<stage 1 adapter>`, the aligned LLM's tables
that stage 2 and serving then read; trainers/align.py).

    manifest = reembed("FEATURES", "FEATURES_ALIGNED", encoder="lora:ALIGNED/llm/lora")

Everything but the tables and the manifest is hard-linked from the source where the file system allows it
(copied where it does not): the examples are the source's, byte for byte. The texts are embedded with
features.embeddings.embed_texts (Ray Data batch inference, cached by text and encoder, the adapter's weights
included), so the new encoder sees exactly the texts the source build embedded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from core import contract
from core.paths import cache_dir
from features.embeddings import embed_texts
from features.folder import FeaturesFolder

TABLES = (contract.VIDEO_EMB, contract.COMMENT_EMB, contract.VIDEO_EMB_TABLE, contract.COMMENT_EMB_TABLE)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def reembed(source: str | Path, out: str | Path, encoder: str, batch_size: int = 64, concurrency: int = 1,
            device: str = "cpu", embed_cache: str | Path | None = None) -> dict:
    """Write `out`: the features folder `source` with its item tables from `encoder`; returns its manifest
    (the source's, with encoder, embedding_dim, embeddings and reembedded_from set). `out` is replaced
    whole, only once the new folder is complete."""
    folder = FeaturesFolder.open(source)
    out = Path(out)
    if out.resolve() == folder.root.resolve():
        raise ValueError(f"reembed: out {out} is the source folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / "features"
        shutil.copytree(folder.root, staged, copy_function=_link_or_copy,
                        ignore=lambda _, names: [n for n in names if n in (*TABLES, contract.MANIFEST)])
        cache = str(embed_cache or cache_dir() / "embeddings")
        stats: dict = {"video": {}, "comment": {}}
        dim = 0
        for kind, catalog, id_column, name in (("video", folder.videos(["video_id", "text"]), "video_id",
                                                contract.VIDEO_EMB),
                                               ("comment", folder.comments(["comment_id", "text"]), "comment_id",
                                                contract.COMMENT_EMB)):
            dim = embed_texts(catalog["text"].to_pylist(), staged / name, encoder=encoder, batch_size=batch_size,
                              concurrency=concurrency, device=device, label=f"{kind} texts", cache_dir=cache,
                              ids=catalog[id_column].to_pylist(), stats=stats[kind])
        manifest = {**folder.manifest, "encoder": encoder, "embedding_dim": dim, "reembedded_from": str(folder.root),
                    "embeddings": {"cache": cache, **{f"{k}_{s}": n for k, v in stats.items() for s, n in v.items()},
                                   "seconds": round(time.time() - started, 1)}}
        (staged / contract.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    return manifest

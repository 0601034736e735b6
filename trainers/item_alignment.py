"""Item-level alignment in stage 1 (`AlignConfig.item_contrast`, the `minilm_aligned` item encoder).

Stage 2 and serving keep the SR model's text adapters over the features' item embeddings (MiniLM), not the LLM.
This contrast makes those adapters carry the LLM's view of the items: the LLM's item vectors (the frozen base
LLM's mean-pooled final hidden states of each video title and comment text, centred per kind, through the same
preference adapter as the LLM's user vectors) against the SR's text-adapted item vectors of the batch's targets,
InfoNCE both ways with negatives from every worker. Serving then embeds a new item with MiniLM alone: the LLM
never runs for it.

    paths = llm_item_tables(folder, llm_path, cache_dir())   # {"video": .npy, "comment": .npy}, once per content
    loss = item_contrast(sr, adapter, "video", targets, table, temperature)
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from features.embeddings import embed_texts
from features.folder import FeaturesFolder
from trainers.data import text_tensors
from trainers.losses import info_nce
from trainers.models.llm import ItemTexts


def llm_item_tables(folder: FeaturesFolder, llm_path: str, root: Path) -> dict[str, str]:
    """The LLM's item vectors per kind as float32 [N, llm_hidden] .npy files (row = item index, centred: the
    kind's mean subtracted), under root/llm_items/<hash of the LLM and the texts>/, computed once with Ray Data
    batch inference (features.embeddings.embed_texts, its per-text cache under root/embeddings)."""
    texts = ItemTexts.from_folder(folder)
    paths = {}
    for kind, values in (("video", texts.videos), ("comment", texts.comments)):
        values = [str(v or "") for v in values]
        digest = hashlib.sha256("\x1f".join([str(llm_path), kind, *values]).encode()).hexdigest()[:16]
        path = root / "llm_items" / digest / f"{kind}.npy"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                raw = Path(tmp) / "raw.npy"
                embed_texts(values, raw, encoder=f"hf:{llm_path}", cache_dir=root / "embeddings",
                            label=f"{kind} texts through the LLM")
                table = np.load(raw)
                np.save(Path(tmp) / "centred.npy", (table - table.mean(0)).astype(np.float32))
                os.replace(Path(tmp) / "centred.npy", path)
        paths[kind] = str(path)
    return paths


def text_item_tables(folder: FeaturesFolder) -> dict[str, torch.Tensor]:
    """The features' own item text vectors (MiniLM), centred per kind: the item contrast's target without an
    LLM. The contrast then trains the SR's text adapters as the LLM's target does, with nothing the LLM knows:
    the sr_rec_item_pretrain control of lsvcr/suite.py."""
    video, comment = text_tensors(folder)
    return {"video": video - video.mean(0), "comment": comment - comment.mean(0)}


def load_item_tables(paths: dict[str, str]) -> dict[str, torch.Tensor]:
    return {kind: torch.from_numpy(np.load(path)) for kind, path in paths.items()}


def item_contrast(sr, adapter: torch.nn.Module, kind: str, idx: torch.Tensor, table: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """InfoNCE both ways between the SR's timeless item vectors and the LLM's (table[idx] through `adapter`,
    normalised) for the distinct items of idx [n] (may be empty: the collectives still run)."""
    idx = idx.unique()
    ours = sr.timeless_item_vectors(kind, idx)  # [m, H]
    theirs = F.normalize(adapter(table[idx.cpu()].to(ours.device)), dim=-1)  # [m, H]
    return (info_nce(ours, theirs, temperature, idx) + info_nce(theirs, ours, temperature, idx)) / 2

"""Class-name embeddings for zero-shot segmentation, cached on disk.

Per *name* (not per class): render every template, encode, L2-normalise each prompt embedding,
average, L2-normalise again (wangf3014/SCLIP@b56bd30 ``clip_segmentor.py``). A class with several names
contributes several queries; post-processing takes the softmax over all queries, then the max over
each class's queries.

The cache key covers backbone id, weights hash, method-weights hashes (if any), template set (content hash)
and the exact name list,
so a change of any of them re-encodes, and random-init weights never share an entry with real ones.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .templates import render, template_set_hash


def default_cache_dir() -> str:
    return os.environ.get("HARNESS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "harness"))


@dataclass
class TextQueries:
    """Unit-norm query embeddings (Q, C) and, for each query, the class it belongs to (Q,)."""

    embeddings: torch.Tensor
    query_class: torch.Tensor
    num_classes: int
    cache_hit: bool = False


def queries_from_names(names: Sequence[Sequence[str]]) -> tuple:
    flat: List[str] = []
    owner: List[int] = []
    for cls_idx, aliases in enumerate(names):
        for n in aliases:
            flat.append(n)
            owner.append(cls_idx)
    return flat, owner


def cache_key(backbone_id: str, weights_id: str, template_set: str, names: Sequence[Sequence[str]],
              method_weights: Optional[Dict[str, str]] = None) -> str:
    """Hash of what the embeddings depend on. Method weights join it (when there are any) because a
    weighted method may carry its own towers: a cache entry is never shared across method weights."""
    fields = {"backbone": backbone_id, "weights": weights_id, "templates": template_set,
              "templates_sha": template_set_hash(template_set), "names": [list(n) for n in names]}
    if method_weights:
        fields["method_weights"] = dict(sorted(method_weights.items()))
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@torch.inference_mode()
def encode_names(model, names: Sequence[str], template_set: str, device: torch.device,
                 batch_size: int = 512) -> torch.Tensor:
    """(len(names), C) unit-norm embeddings: mean of the normalised template embeddings, renormalised."""
    bb = model.backbone if hasattr(model, "backbone") else model
    prompts: List[str] = []
    counts: List[int] = []
    for n in names:
        p = render(template_set, n)
        prompts.extend(p)
        counts.append(len(p))
    tokens = bb.tokenize(prompts)
    outs = []
    for i in range(0, len(prompts), batch_size):
        e = bb.encode_text(tokens[i:i + batch_size].to(device)).float()
        outs.append(e / e.norm(dim=-1, keepdim=True))
    per_prompt = torch.cat(outs)
    embs = []
    start = 0
    for c in counts:
        m = per_prompt[start:start + c].mean(0)
        embs.append(m / m.norm())
        start += c
    return torch.stack(embs)


def class_queries(model, names: Sequence[Sequence[str]], template_set: str, device: torch.device,
                  cache_dir: Optional[str] = None, use_cache: bool = True) -> TextQueries:
    """Query embeddings for a dataset's name list (one list of aliases per class), cached on disk."""
    flat, owner = queries_from_names(names)
    bb = model.backbone if hasattr(model, "backbone") else model
    key = cache_key(bb.spec.id, bb.weights_id, template_set, names, getattr(model, "method_weights", None))
    path = os.path.join(cache_dir or default_cache_dir(), "text", f"{bb.spec.id}-{key}.pt")
    if use_cache and os.path.isfile(path):
        emb = torch.load(path, map_location="cpu")["embeddings"]
        hit = True
    else:
        emb = encode_names(model, flat, template_set, device).cpu()
        hit = False
        if use_cache:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + f".tmp{os.getpid()}"
            torch.save({"embeddings": emb, "names": flat, "backbone": bb.spec.id, "weights": bb.weights_id,
                        "templates": template_set}, tmp)
            os.replace(tmp, path)
    return TextQueries(embeddings=emb.to(device), query_class=torch.tensor(owner, device=device),
                       num_classes=len(names), cache_hit=hit)

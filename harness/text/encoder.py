"""Class-name embeddings for zero-shot segmentation, cached on disk.

Per *name* (not per class): render every template, encode, L2-normalise each prompt embedding,
average, L2-normalise again (wangf3014/SCLIP@b56bd30 ``clip_segmentor.py``). A class with several names
contributes several queries; post-processing takes the softmax over all queries, then the max over
each class's queries.

The cache key covers backbone id, weights hash, method-weights hashes (if any), template set (content hash)
and the exact name list,
so a change of any of them re-encodes, and random-init weights never share an entry with real ones.

Below the per-name-list cache sits a per-*prompt* store (same tower identity, any template set or name
list): a prompt already encoded for another dataset, alias or template set is never encoded again
(``"a photo of a person."`` is shared by VOC, Context, COCO, ...). What is encoded is sorted by token
length so that each batch is cut at its own longest prompt (the tower is causal and EOT-pooled, see
``OpenCLIPBackbone.encode_text``); :class:`TextStats` reports the prompts per second and the tokens spent
against the 77-token encoding every OVSS repository runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..io_safety import atomic_torch_save
from .templates import render, template_set_hash


def default_cache_dir() -> str:
    return os.environ.get("HARNESS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "harness"))


#: the context length of every CLIP text tower in the harness (open_clip ``context_length``); the
#: reference OVSS loops encode every prompt at this length
CONTEXT_LENGTH = 77


@dataclass
class TextStats:
    """What one encoding cost: prompts rendered, distinct, actually run through the tower, the tokens that
    run spent (sum over batches of batch size x the batch's longest prompt) against the same prompts at
    77 tokens each, and the seconds it took."""

    prompts: int = 0
    distinct: int = 0
    encoded: int = 0
    tokens: int = 0
    tokens_77: int = 0
    seconds: float = 0.0

    @property
    def prompts_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    @property
    def token_ratio(self) -> float:
        """77-token cost / our cost (> 1 means fewer tokens than the reference loop)."""
        return self.tokens_77 / self.tokens if self.tokens else 0.0

    def as_dict(self) -> Dict[str, float]:
        return {**asdict(self), "prompts_per_s": round(self.prompts_per_s, 1),
                "token_ratio": round(self.token_ratio, 3)}

    def summary(self) -> str:
        if not self.encoded:
            return f"text: {self.prompts} prompts, all cached"
        return (f"text: {self.encoded} of {self.prompts} prompts encoded ({self.distinct} distinct) in "
                f"{self.seconds:.1f} s, {self.prompts_per_s:.0f} prompts/s, {self.tokens} tokens "
                f"({self.token_ratio:.2f}x fewer than at {CONTEXT_LENGTH})")


@dataclass
class TextQueries:
    """Unit-norm query embeddings (Q, C) and, for each query, the class it belongs to (Q,)."""

    embeddings: torch.Tensor
    query_class: torch.Tensor
    num_classes: int
    cache_hit: bool = False
    stats: TextStats = field(default_factory=TextStats)


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


class PromptStore:
    """Unit-norm embeddings of single prompts for one text tower, kept on disk across runs and datasets.

    The file is rewritten atomically after each encoding (a concurrent writer can at worst drop the other's
    new entries, which are then encoded again; an entry is never torn). ``path=None`` keeps it in memory.
    """

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self.entries: Dict[str, torch.Tensor] = {}
        if path and os.path.isfile(path):
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
                entries = dict(data["prompts"])
                ok = data.get("sha256") == tensors_digest(entries)
            except Exception:  # unreadable: a corrupt cache entry is rebuilt, never used
                ok = False
            if ok:
                self.entries = entries
            else:
                _rebuild_notice(path)

    def save(self) -> None:
        if not self.path:
            return
        atomic_torch_save({"prompts": self.entries, "sha256": tensors_digest(self.entries)}, self.path,
                          "text cache")


def tensors_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of ``tensors``: a cache entry must match it to be used."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _rebuild_notice(path: str) -> None:
    print(f"harness: text cache {path} is corrupt (unreadable or fails its checksum); rebuilding it",
          file=sys.stderr)


def _tower_key(bb, method_weights: Optional[Dict[str, str]]) -> str:
    fields = {"backbone": bb.spec.id, "weights": bb.weights_id,
              "method_weights": dict(sorted((method_weights or {}).items()))}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


@torch.inference_mode()
def encode_prompts(bb, prompts: Sequence[str], device: torch.device, batch_size: int = 512,
                   store: Optional[PromptStore] = None, stats: Optional[TextStats] = None) -> torch.Tensor:
    """(len(prompts), C) unit-norm embeddings of single prompts, each distinct prompt encoded at most once.

    Prompts missing from ``store`` are sorted by token length and encoded in batches of ``batch_size``;
    each batch costs its own longest prompt, not 77 tokens (``bb.encode_text`` cuts the padding).
    """
    stats = stats if stats is not None else TextStats()
    store = store if store is not None else PromptStore(None)
    distinct = list(dict.fromkeys(prompts))
    todo = [p for p in distinct if p not in store.entries]
    stats.prompts += len(prompts)
    stats.distinct += len(distinct)
    if todo:
        t0 = time.perf_counter()
        tokens = bb.tokenize(todo)
        lengths = tokens.argmax(dim=-1) + 1  # EOT is the largest id: its position + 1 is the prompt length
        order = torch.argsort(lengths, stable=True)
        for i in range(0, len(todo), batch_size):
            idx = order[i:i + batch_size]
            e = bb.encode_text(tokens[idx].to(device)).float()
            e = (e / e.norm(dim=-1, keepdim=True)).cpu()
            for j, k in enumerate(idx.tolist()):
                store.entries[todo[k]] = e[j]
            stats.tokens += len(idx) * int(lengths[idx].max())
        stats.encoded += len(todo)
        stats.tokens_77 += len(todo) * CONTEXT_LENGTH
        stats.seconds += time.perf_counter() - t0
        store.save()
    return torch.stack([store.entries[p] for p in prompts]).to(device)


@torch.inference_mode()
def encode_names(model, names: Sequence[str], template_set: str, device: torch.device,
                 batch_size: int = 512, store: Optional[PromptStore] = None,
                 stats: Optional[TextStats] = None) -> torch.Tensor:
    """(len(names), C) unit-norm embeddings: mean of the normalised template embeddings, renormalised."""
    bb = model.backbone if hasattr(model, "backbone") else model
    prompts: List[str] = []
    counts: List[int] = []
    for n in names:
        p = render(template_set, n)
        prompts.extend(p)
        counts.append(len(p))
    per_prompt = encode_prompts(bb, prompts, device, batch_size, store, stats)
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
    root = os.path.join(cache_dir or default_cache_dir(), "text")
    path = os.path.join(root, f"{bb.spec.id}-{key}.pt")
    stats = TextStats()
    emb = None
    if use_cache and os.path.isfile(path):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            emb = data["embeddings"]
            if data.get("sha256") != tensors_digest({"embeddings": emb}):
                emb = None
        except Exception:  # unreadable
            emb = None
        if emb is None:  # a corrupt cache entry is rebuilt, never used
            _rebuild_notice(path)
        elif tuple(emb.shape[:1]) != (len(flat),):
            emb = None
    hit = emb is not None
    if emb is None:
        mw = getattr(model, "method_weights", None)
        store = PromptStore(os.path.join(root, "prompts", f"{bb.spec.id}-{_tower_key(bb, mw)}.pt") if use_cache
                            else None)
        emb = encode_names(model, flat, template_set, device, store=store, stats=stats).cpu()
        if use_cache:
            atomic_torch_save({"embeddings": emb, "names": flat, "backbone": bb.spec.id, "weights": bb.weights_id,
                               "templates": template_set, "sha256": tensors_digest({"embeddings": emb})}, path,
                              "text cache")
    if hit:
        stats.prompts = len(flat) * len(render(template_set, "x"))
    return TextQueries(embeddings=emb.to(device), query_class=torch.tensor(owner, device=device),
                       num_classes=len(names), cache_hit=hit, stats=stats)

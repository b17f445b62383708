"""Fill a :class:`~harness.probes.cache.FeatureCache` from a dataset: batched frozen forwards, resumable."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..io_safety import file_lock
from ..runtime import Dist
from ..runtime import progress as progress_bar
from .cache import FeatureCache
from .data import convert_sample

Featurize = Callable[[torch.Tensor], Dict[str, torch.Tensor]]


class FixedViewSamples(Dataset):
    """Deterministic samples of an mmseg dataset (no augmentation): tensors plus the sizes the caller needs.

    Returns dict(img=(3, H, W) normalised, target=label or depth (original pipeline output),
    img_hw=(H, W) of the network input before centre padding, ann_path=the label / depth file).
    """

    def __init__(self, base: Any, kind: str, mean_255, std_255, pad_to=None) -> None:
        self.base, self.kind = base, kind
        self.mean_255, self.std_255, self.pad_to = list(mean_255), list(std_255), pad_to

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        results = self.base[i]
        s: Dict[str, Any] = dict(convert_sample(results, self.kind, self.mean_255, self.std_255, self.pad_to))
        s["img_hw"] = torch.tensor(s["img"].shape[-2:], dtype=torch.int32)
        s["ann_path"] = str(results.get("seg_map_path") or results.get("depth_map_path") or "")
        return s


def fill_cache(cache: FeatureCache, samples: Dataset, featurize: Featurize,
               item_fields: Callable[[Dict[str, Any]], Dict[str, np.ndarray]], batch_size: int, num_workers: int,
               show_progress: bool, desc: str, dist: Optional[Dist] = None) -> FeatureCache:
    """Append every sample not yet in ``cache`` (images of equal size are batched), then mark it complete.

    ``featurize`` maps a batch of images to per-image tensors (first dim = batch); ``item_fields`` adds the
    non-feature fields of a sample (labels, sizes). An interruption flushes what was written; calling again
    continues where it stopped. A second process filling the same cache waits for the lock, then finds it
    complete (or continues where the first stopped).

    Under torchrun (``dist`` with several ranks) the ranks share the forwards: see :func:`_fill_sharded`.
    """
    if dist is not None and dist.world_size > 1:
        return _fill_sharded(cache, samples, featurize, item_fields, batch_size, num_workers, show_progress, desc,
                             dist)
    with file_lock(cache.path, "feature cache"):
        cache.reload()
        return _fill(cache, samples, featurize, item_fields, batch_size, num_workers, show_progress, desc)


def _items(samples: Dataset, indices: Sequence[int], featurize: Featurize,
           item_fields: Callable[[Dict[str, Any]], Dict[str, np.ndarray]], dtypes: Dict[str, str]
           ) -> List[Dict[str, np.ndarray]]:
    """The cache items of ``samples[indices]`` in order (consecutive images of one size share a forward)."""
    out: List[Dict[str, np.ndarray]] = []
    pending: List[Dict[str, Any]] = []

    def flush() -> None:
        if not pending:
            return
        with torch.no_grad():
            feats = featurize(torch.stack([p["img"] for p in pending]))
        for j, p in enumerate(pending):
            item = {k: v[j].detach().float().cpu().numpy().astype(dtypes[k]) for k, v in feats.items()}
            item.update(item_fields(p))
            out.append(item)
        pending.clear()

    for i in indices:
        smp = samples[i]
        if pending and tuple(smp["img"].shape) != tuple(pending[0]["img"].shape):
            flush()
        pending.append(smp)
    flush()
    return out


def _fill_sharded(cache: FeatureCache, samples: Dataset, featurize: Featurize,
                  item_fields: Callable[[Dict[str, Any]], Dict[str, np.ndarray]], batch_size: int, num_workers: int,
                  show_progress: bool, desc: str, dist: Dist) -> FeatureCache:
    """Every rank featurizes its block of each round (rank r: images ``base + r*B .. base + (r+1)*B - 1``);
    rank 0 gathers the blocks and appends them in image order, so the cache is the one a single process writes
    (resumable the same way). Rank 0 holds the cache's lock; the other ranks read the cache once it is complete.
    ``num_workers`` is unused: each rank loads its own block's samples (the forwards dominate)."""
    import torch.distributed as tdist

    del num_workers
    n, b, world = len(samples), max(1, int(batch_size)), dist.world_size
    with contextlib.ExitStack() as stack:
        start = [n]
        if dist.is_main:
            stack.enter_context(file_lock(cache.path, "feature cache"))
            cache.reload()
            start[0] = cache.open_for_write()
            if cache.complete:
                cache.close()
                start[0] = n
        tdist.broadcast_object_list(start, src=0)
        bar = progress_bar(total=n, desc=desc, enabled=show_progress and dist.is_main)
        bar.update(start[0])
        try:
            for base in range(start[0], n, b * world):
                lo = min(base + dist.rank * b, n)
                mine = _items(samples, range(lo, min(lo + b, n)), featurize, item_fields, cache.fields)
                blocks: List[Any] = [None] * world if dist.is_main else []
                tdist.gather_object(mine, blocks if dist.is_main else None, dst=0)
                if dist.is_main:
                    for block in blocks:
                        for item in block:
                            cache.append(item)
                    bar.update(sum(len(x) for x in blocks))
            if dist.is_main and not cache.complete:
                cache.finish()
        except BaseException:
            if dist.is_main:
                cache.close()
            raise
        finally:
            bar.close()
    dist.barrier()  # rank 0 has finished (and unlocked) the cache
    if not dist.is_main:
        cache.reload()
    return cache


def _fill(cache: FeatureCache, samples: Dataset, featurize: Featurize,
          item_fields: Callable[[Dict[str, Any]], Dict[str, np.ndarray]], batch_size: int, num_workers: int,
          show_progress: bool, desc: str) -> FeatureCache:
    start = cache.open_for_write()
    if cache.complete:
        cache.close()
        return cache
    n = len(samples)
    loader = DataLoader(Subset(samples, range(start, n)), batch_size=None, num_workers=num_workers,
                        persistent_workers=False)
    bar = progress_bar(total=n, desc=desc, enabled=show_progress)
    bar.update(start)
    pending: List[Dict[str, Any]] = []

    def flush() -> None:
        if not pending:
            return
        imgs = torch.stack([p["img"] for p in pending])
        with torch.no_grad():
            feats = featurize(imgs)
        for j, p in enumerate(pending):
            item = {k: v[j].detach().float().cpu().numpy().astype(cache.fields[k]) for k, v in feats.items()}
            item.update(item_fields(p))
            cache.append(item)
        bar.update(len(pending))
        pending.clear()

    try:
        for s in loader:
            if pending and (tuple(s["img"].shape) != tuple(pending[0]["img"].shape) or len(pending) >= batch_size):
                flush()
            pending.append(s)
        flush()
        cache.finish()
    except BaseException:
        cache.close()
        raise
    finally:
        bar.close()
    return cache

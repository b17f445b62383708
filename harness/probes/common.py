"""Small pieces both probes use: seeded blocks, the identity of random weights, dataset fingerprints.

The probe run itself (identity, skip/resume, artifacts) lives with the evaluators
(:mod:`harness.evaluators.probe_base`), since it is part of the run lifecycle.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Dict, Iterator, Sequence

import torch

from ..errors import ConfigError
from ..methods.base import DenseModel

MODES = ("faithful", "fast")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for a block (head initialisation) and restore the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def weights_identity(model: DenseModel) -> str:
    """The weights hash, or for ``random-init`` a digest of the actual random tensors.

    Why: "random-init" names no particular tensors; a cache written by one random model must never be
    read with features of another (a family that does not seed its random init would otherwise mix them).
    """
    wid = str(model.backbone.weights_id)
    if wid != "random-init":
        return wid
    h = hashlib.sha256()
    for name, t in sorted(model.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return "random-init:" + h.hexdigest()[:16]


def dataset_fingerprint(ds: Any) -> str:
    """Hash of an mmseg dataset's files (paths, sizes, modification times): a cache follows its data.

    Why: the cache is keyed by the data root, and a root can be re-prepared with other files in place.
    """
    h = hashlib.sha256()
    for i in range(len(ds)):
        info = ds.get_data_info(i)
        for key in ("img_path", "seg_map_path", "depth_map_path"):
            p = info.get(key)
            if p:
                try:
                    st = os.stat(p)
                    h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                except OSError:
                    h.update(f"{p}|missing\n".encode())
    return h.hexdigest()[:16]


def require(settings: Dict[str, Any], keys: Sequence[str], where: str) -> None:
    """Raise a :class:`ConfigError` naming the protocol file when settings lack ``keys``."""
    missing = [k for k in keys if k not in settings]
    if missing:
        raise ConfigError(f"protocol {where} lacks setting(s) {', '.join(missing)}; add them to the YAML file")


def lr_name(lr: float) -> str:
    """Name of a head in a learning-rate grid (``lr=0.001``)."""
    return f"lr={lr:g}"

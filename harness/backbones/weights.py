"""Finding weights on disk, hashing them, and saying clearly what is missing.

Order: ``--weights FILE``; then the local Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME`` /
``~/.cache/huggingface/hub``), where open_clip and timm put their downloads; then open_clip's URL cache
(``~/.cache/clip``) for open_clip ids, torch hub's checkpoint folder for other files with a URL. Nothing is
downloaded unless the user passes ``--download`` (no network must never mean a stalled run): without it a
missing file is a :class:`WeightsError` naming the cache path and the command that fetches the file.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, List, Optional, Sequence, Tuple

from ..errors import WeightsError
from .base import BackboneSpec

HF_FILENAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                "pytorch_model.bin")


def hf_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(home, "hub")


def clip_url_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "clip")


def url_cache_dir(spec: BackboneSpec) -> str:
    """Where a URL's file is looked for: open_clip's URL cache for open_clip ids, else torch hub's checkpoint
    folder (``$TORCH_HOME/hub/checkpoints``, where torchvision keeps its downloads)."""
    if spec.family == "open_clip":
        return clip_url_cache_dir()
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def split_hf_hub(hf_hub: str) -> Tuple[str, List[str]]:
    """'org/repo/file' -> ('org/repo', ['file']); 'org/repo/' or 'org/repo' -> ('org/repo', defaults)."""
    parts = hf_hub.strip("/").split("/")
    repo = "/".join(parts[:2])
    fname = "/".join(parts[2:])
    return repo, ([fname] if fname else list(HF_FILENAMES))


def find_in_hf_cache(repo_id: str, filenames: List[str]) -> Optional[str]:
    """Path of the first of ``filenames`` cached for ``repo_id`` (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with open_clip and timm
        return None
    for fn in filenames:
        try:
            p = try_to_load_from_cache(repo_id, fn, cache_dir=hf_cache_dir())
        except Exception:  # malformed cache entries must not hide the clear error below
            p = None
        if isinstance(p, str) and os.path.isfile(p):
            return p
    return None


def find_local_weights(spec: BackboneSpec) -> Optional[str]:
    if spec.hf_hub:
        repo, files = split_hf_hub(spec.hf_hub)
        p = find_in_hf_cache(repo, files)
        if p:
            return p
    if spec.url:
        p = os.path.join(url_cache_dir(spec), os.path.basename(spec.url))
        if os.path.isfile(p):
            return p
    return None


def fetch_command(spec: BackboneSpec) -> str:
    """A command that, run on a machine with network, puts the weights where we look."""
    if spec.hf_hub:
        repo, files = split_hf_hub(spec.hf_hub)
        return f"huggingface-cli download {repo} {files[0]}"
    return f"wget -P {url_cache_dir(spec)} {spec.url}"


def resolve_weights(spec: BackboneSpec, weights_file: Optional[str], allow_download: bool) -> str:
    """Return a local weights path for ``spec`` or raise :class:`WeightsError`."""
    if weights_file:
        if not os.path.isfile(weights_file):
            raise WeightsError(f"--weights {weights_file}: no such file")
        return weights_file
    local = find_local_weights(spec)
    if local:
        return local
    if allow_download:
        return download(spec)
    where = []
    if spec.hf_hub:
        repo, files = split_hf_hub(spec.hf_hub)
        where.append(f"{os.path.join(hf_cache_dir(), 'models--' + repo.replace('/', '--'))} ({' or '.join(files)})")
    if spec.url:
        where.append(os.path.join(url_cache_dir(spec), os.path.basename(spec.url)))
    raise WeightsError(
        f"no local weights for backbone {spec.id!r} ({spec.arch}, {spec.weights_tag}).\n"
        f"  looked in: {'; '.join(where)}\n"
        f"  fix: on a machine with network run `{fetch_command(spec)}` (then copy the cache here),\n"
        f"       or pass --weights FILE, or --download to let the harness fetch it,\n"
        f"       or --random-init to run the same architecture without weights (numbers are then meaningless)."
    )


def download(spec: BackboneSpec) -> str:
    """Explicitly requested download through the libraries' own code paths."""
    try:
        if spec.hf_hub:
            from huggingface_hub import hf_hub_download

            repo, files = split_hf_hub(spec.hf_hub)
            last: Optional[Exception] = None
            for fn in files:
                try:
                    return hf_hub_download(repo, fn, cache_dir=hf_cache_dir())
                except Exception as e:  # try the next candidate file name
                    last = e
            raise WeightsError(f"download of {spec.hf_hub} failed: {last}")
        if spec.family != "open_clip":
            import torch.hub

            dest = os.path.join(url_cache_dir(spec), os.path.basename(spec.url))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            torch.hub.download_url_to_file(spec.url, dest)
            return dest
        from open_clip.pretrained import download_pretrained_from_url

        return download_pretrained_from_url(spec.url, cache_dir=clip_url_cache_dir())
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(f"download of weights for {spec.id!r} failed ({e}); see `harness run --help` "
                           f"for --weights FILE") from e


def check_loaded_keys(model: Any, missing: Sequence[str], unexpected: Sequence[str], what: str,
                      hint: str = "") -> None:
    """After a non-strict ``load_state_dict``: raise one :class:`WeightsError` when keys were missing (parameters
    still on the meta device count) or unexpected. ``what`` opens the message and names the file; the caller
    has already dropped the keys its layout leaves out on purpose (e.g. a classifier head)."""
    missing = list(missing)
    missing += [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and n not in missing]
    if missing or unexpected:
        raise WeightsError(f"{what}: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                           f"(e.g. {list(unexpected)[:3]}){hint}")


def error_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's text, shortened: loaders' messages (missing-key lists, pickle dumps)
    can run to pages, and the user needs one line naming the file and what was expected."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, cached next to nothing: weights are hashed once per run (~1 s per 500 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()

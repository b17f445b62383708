"""The CLIP rows of the figure: a text query's heatmap and the argmax segmentation over a name set."""
from __future__ import annotations

import os
from typing import List, Tuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..methods.base import DenseModel
from ..ovss.inference import postprocess
from ..text.names import SEPARATORS, available_name_sets, load_name_set, parse_name_lines

#: the name set used when ``--names`` is not given: PASCAL VOC's 20 objects + background, in the
#: SCLIP-lineage file (harness/text/names/sclip/voc21.txt, see names/README.md for its source)
DEFAULT_NAMES = "voc21"


def resolve_names(value: str, name_set: str) -> Tuple[str, List[List[str]]]:
    """``--names``: a key of ``name_set`` (``voc21``) or a file with one class per line -> (label, names).

    A file is read like the SCLIP-lineage name files: alternative names of a class on one line,
    separated by ``, `` (:data:`harness.text.names.SEPARATORS`).
    """
    if os.path.isfile(value):
        with open(value, "r", encoding="utf-8") as f:
            names = [n for n in parse_name_lines(f.readlines(), SEPARATORS["sclip"]) if any(a.strip() for a in n)]
        names = [[a.strip() for a in n if a.strip()] for n in names]
        if not names:
            raise ConfigError(f"--names {value}: the file names no class (expected one class per line)")
        return os.path.basename(value), names
    keys = available_name_sets().get(name_set, [])
    if value not in keys:
        raise ConfigError(f"--names {value}: neither a file nor a name set key; expected a file with one class "
                          f"per line or one of {', '.join(keys)}")
    return value, load_name_set(name_set, value)


def default_query(names: List[List[str]]) -> str:
    """``a photo of a <name>.`` for class 1 when the set has several classes (class 0 is the background in
    the with-background sets VOC21, Context-60 and COCO-Object), else class 0. PH-Reg Fig. 1 shows one query."""
    aliases = names[1] if len(names) > 1 else names[0]
    return f"a photo of a {aliases[0].strip()}."


@torch.inference_mode()
def encode_query(model: DenseModel, query: str, device: torch.device) -> torch.Tensor:
    """(C,) unit-norm embedding of ``query`` used verbatim as one prompt (no templates: it is a sentence)."""
    if not query.strip():
        raise ConfigError("--query is empty; give a sentence such as 'a photo of a cat'")
    bb = model.backbone
    e = bb.encode_text(bb.tokenize([query]).to(device)).float()[0].cpu()
    return e / e.norm()


def query_map(patch: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine of each token of (C, h, w) features with a unit (C,) query: (h, w)."""
    x = patch.float()
    return torch.einsum("chw,c->hw", x / x.norm(dim=0, keepdim=True).clamp_min(1e-12), query.float())


def segment(patch: torch.Tensor, queries: torch.Tensor, query_class: torch.Tensor, num_classes: int,
            size: Tuple[int, int], logit_scale: float) -> torch.Tensor:
    """(H, W) class indices: cosine logits upsampled to ``size`` (bilinear), then argmax over classes.

    The class score is the max over its queries (SCLIP's post-processing, :func:`harness.ovss.inference.
    postprocess`), without the protocol's probability or area thresholds: the picture shows the argmax.
    """
    x = patch.float()
    x = x / x.norm(dim=0, keepdim=True).clamp_min(1e-12)
    logits = torch.einsum("chw,qc->qhw", x, queries.float().cpu())
    logits = F.interpolate(logits.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]
    return postprocess(logits, query_class.cpu(), num_classes, logit_scale, prob_thd=0.0, area_thd=None)

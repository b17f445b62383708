"""CLIP ViT backbones through open_clip: each id binds architecture, weights and preprocessing.

OpenAI and DFN weights were trained with QuickGELU, so their ids use open_clip's ``-quickgelu``
architectures (building ``ViT-B-16`` with GELU under OpenAI weights silently degrades features:
open_clip issue #771). Mean/std and the weights' home come from open_clip's own pretrained table.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import WeightsError
from ..registry import BACKBONE_FAMILIES, BACKBONES
from .base import Backbone, BackboneSpec, BlockParts, TokenLayout, Tokens, attention_qkv_heads
from .pos_embed import interpolate_patch_pos_embed
from .weights import error_line, sha256_file

# open_clip.constants.OPENAI_DATASET_MEAN / _STD (the same values every CLIP repo uses)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _clip_spec(id: str, arch: str, tag: str, patch: int, hf_hub: str, url: str, description: str) -> BackboneSpec:
    return BackboneSpec(id=id, family="open_clip", arch=arch, weights_tag=tag, patch_size=patch, mean=CLIP_MEAN,
                        std=CLIP_STD, native_size=224, hf_hub=hf_hub, url=url, has_text=True,
                        description=description)


# hf_hub / url: open_clip 3.3 pretrained table (open_clip.get_pretrained_cfg(arch, tag)).
for _spec in (
    _clip_spec("clip-b16-openai", "ViT-B-16-quickgelu", "openai", 16, "timm/vit_base_patch16_clip_224.openai/",
               "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85"
               "e4ecb61988df416f/ViT-B-16.pt", "OpenAI CLIP ViT-B/16 (QuickGELU)"),
    _clip_spec("clip-b16-laion2b", "ViT-B-16", "laion2b_s34b_b88k", 16, "laion/CLIP-ViT-B-16-laion2B-s34B-b88K/", "",
               "OpenCLIP ViT-B/16 trained on LAION-2B (laion2b_s34b_b88k)"),
    _clip_spec("clip-b16-dfn2b", "ViT-B-16-quickgelu", "dfn2b", 16, "apple/DFN2B-CLIP-ViT-B-16/", "",
               "DFN-CLIP ViT-B/16 trained on DFN-2B (QuickGELU)"),
    _clip_spec("clip-l14-openai", "ViT-L-14-quickgelu", "openai", 14, "timm/vit_large_patch14_clip_224.openai/",
               "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e"
               "0eca1737a03836/ViT-L-14.pt", "OpenAI CLIP ViT-L/14 (QuickGELU)"),
):
    BACKBONES.add(_spec.id, _spec)


class _VisionOnly(nn.Module):
    """Stands in for an open_clip ``CLIP`` that holds only the vision tower."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual


@BACKBONE_FAMILIES.register("open_clip")
class OpenCLIPBackbone(Backbone):
    """Adapter over ``open_clip``'s ``VisionTransformer`` (+ text tower)."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights_id: str) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        self.visual = model.visual
        self.weights_id = weights_id
        if getattr(self.visual, "attn_pool", None) is not None or self.visual.proj is None:
            raise WeightsError(f"{spec.arch}: attention-pool or projection-free CLIP towers are not supported")
        self._tokenizer = None

    def with_visual(self, visual: nn.Module) -> "OpenCLIPBackbone":
        """An adapter of the same id and weights over another vision tower (e.g. a distilled copy); vision only,
        the text stays with this backbone."""
        return type(self)(self.spec, _VisionOnly(visual), self.weights_id)

    @classmethod
    def build(cls, spec: BackboneSpec, weights_path: Optional[str]) -> "OpenCLIPBackbone":
        import open_clip

        if weights_path is None:
            # fixed seed: every random-init build is the same network, so cached text embeddings stay valid
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = _quiet(open_clip.create_model, spec.arch, pretrained=None)
            return cls(spec, model, "random-init")
        try:
            model = open_clip.create_model(spec.arch, pretrained=weights_path)
        except Exception as e:  # wrong architecture, truncated file, ...
            raise WeightsError(f"--weights {weights_path}: could not load into {spec.arch} for backbone {spec.id!r}: "
                               f"{error_line(e)}. Expected an open_clip checkpoint of this architecture "
                               f"(state dict in .bin/.pt/.safetensors, read with weights_only=True)") from e
        return cls(spec, model, sha256_file(weights_path))

    # -- vision ------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        return int(self.visual.class_embedding.shape[-1])

    def embed(self, images: torch.Tensor) -> Tokens:
        """conv1 patches, CLS, bicubic-interpolated positional embedding (before ``ln_pre``)."""
        v = self.visual
        x = v.conv1(images)  # (B, D, h, w); the conv floors sizes that are not patch multiples
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = x.flatten(2).transpose(1, 2)
        cls_tok = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls_tok, x], dim=1)
        pos = v.positional_embedding
        pos = torch.cat([pos[:1], interpolate_patch_pos_embed(pos[1:], grid)], dim=0)
        return Tokens(x + pos.to(x.dtype), TokenLayout.standard(grid, has_cls=True))

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_pre(x)

    def block(self, i: int) -> BlockParts:
        blk = self.visual.transformer.resblocks[i]
        attn: nn.MultiheadAttention = blk.attn
        if getattr(self.visual.transformer, "batch_first", True):
            run = blk
        else:  # older open_clip runs the stack sequence-first
            def run(x: torch.Tensor) -> torch.Tensor:
                return blk(x.transpose(0, 1)).transpose(0, 1)
        return BlockParts(norm1=blk.ln_1, qkv=attention_qkv_heads(attn.in_proj_weight, attn.in_proj_bias,
                                                                    attn.num_heads),
                          out_proj=attn.out_proj, norm2=blk.ln_2, mlp=blk.mlp, mlp_act=blk.mlp.gelu,
                          mlp_hidden=int(blk.mlp.c_fc.out_features), num_heads=int(attn.num_heads), run=run,
                          ls1=blk.ls_1, ls2=blk.ls_2)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_post(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.visual.proj

    # -- text --------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        import open_clip

        self.check_text()
        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.spec.arch)
        return self._tokenizer(list(texts))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings; for causal, EOT-pooled towers the padding after the longest prompt is cut.

        With a causal mask no position attends to later ones, and the pooled EOT token (the largest id,
        ``text_pool_type='argmax'``) sits before the cut, so the result equals the full 77-token pass
        (checked in tests) at a fraction of the cost: prompts are ~10-20 tokens long.
        """
        self.check_text()
        m = self.model
        if getattr(m, "text_pool_type", None) != "argmax" or getattr(m, "attn_mask", None) is None:
            return m.encode_text(tokens)
        eot = tokens.argmax(dim=-1)
        n = int(eot.max()) + 1
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens[:, :n]).to(cast) + m.positional_embedding[:n].to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:n, :n]))
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = m.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def _quiet(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Call ``fn`` with open_clip's "No pretrained weights loaded" warning silenced (we say it ourselves)."""
    import logging

    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return fn(*args, **kwargs)
    finally:
        logger.setLevel(level)

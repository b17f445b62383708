"""The method half of the dense interface: a cleaning method says what it touches; :class:`DenseModel` runs it.

A method (one registered :class:`Method` subclass in one file) declares in ``TOUCHES`` which places of
the forward it changes, and implements only those hooks:

==============  ===================================================  ==========================
touches         what                                                 implement
==============  ===================================================  ==========================
``backbone``    the vision weights replaced (a trained student):     :meth:`Method.vision`
                the stages run on the method's own copy; the text
                tower stays the backbone's
``tokens``      tokens added to the sequence (e.g. a test-time       :meth:`Method.add_tokens`
                register after the patches, before the pre-norm)
``layers``      hooks on the MLP hidden units of chosen layers       :meth:`Method.layer_hooks`
``last_block``  the last block rebuilt (MaskCLIP, SCLIP, NACLIP...)  :meth:`Method.last_block`
``post_norm``   a map after the final norm, before CLIP's ``proj``   :meth:`Method.post_norm`
                (a denoiser)
``wrapper``     a wrapper around the whole forward (TTA)             :meth:`Method.wrap`
==============  ===================================================  ==========================

Methods compose with ``+`` (``ttr+naclip``, ``naclip+tta``): at most one vision replacement, one last-block
rule and one wrapper per composition. :class:`DenseModel` is the one object evaluators receive; it runs the
backbone's stages (:mod:`harness.backbones.base`) with the parts' hooks in place, and tells a multi-method
pass how much of the trunk it can share (:meth:`DenseModel.shared_blocks`, :func:`forward_dense_many`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..backbones.base import Backbone, BackboneSpec, BlockParts, DenseFeatures, Tokens, split_features
from ..errors import ConfigError, WeightsError

#: the places a method can touch, in the order they act in the forward (also the canonical order of parts)
TOUCH_KINDS = ("backbone", "tokens", "layers", "last_block", "post_norm", "wrapper")
#: a layer hook: (hidden activations (B, L, H), layout of the tokens) -> edited activations
LayerHook = Callable[[torch.Tensor, Tokens], torch.Tensor]
#: a forward the wrapper may call: normalised images -> dense features
Forward = Callable[[torch.Tensor], DenseFeatures]


class Method(nn.Module):
    """One cleaning method, or one part of a composition. Subclasses set the class attributes below.

    Attributes:
        PARAMS: tunable parameters and their defaults (``--param NAME=VALUE``); recorded in every result.
        CONFIG: the fixed configuration that the name implies; recorded too.
        TOUCHES: which of :data:`TOUCH_KINDS` the method implements.
        WEIGHTS: ``None`` (training-free), ``"optional"`` or ``"required"``: whether ``--method-weights``
            applies. :meth:`bind` loads the file; its sha256 joins the run's identity.
        WEIGHTS_HELP: what the weights file is and how to get one (shown when it is missing).
    """

    PARAMS: ClassVar[Dict[str, Any]] = {}
    CONFIG: ClassVar[Dict[str, Any]] = {}
    TOUCHES: ClassVar[Tuple[str, ...]] = ()
    WEIGHTS: ClassVar[Optional[str]] = None
    WEIGHTS_HELP: ClassVar[str] = ""

    def __init__(self, **params: Any) -> None:
        super().__init__()
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            valid = ", ".join(sorted(self.PARAMS)) or "none"
            raise ConfigError(f"method {self.name!r} has no parameter(s) {', '.join(unknown)}; valid: {valid}")
        bad = [k for k in self.TOUCHES if k not in TOUCH_KINDS]
        if bad:
            raise TypeError(f"{type(self).__name__}.TOUCHES has unknown kind(s) {bad}; one of {TOUCH_KINDS}")
        self.params: Dict[str, Any] = {**self.PARAMS, **params}

    @property
    def name(self) -> str:
        return str(getattr(type(self), "registry_name", type(self).__name__))

    def touches(self, kind: str) -> bool:
        return kind in self.TOUCHES

    def bind(self, backbone: Backbone, weights_path: Optional[str]) -> Optional[str]:
        """Check that the method suits ``backbone`` and load its weights; return the file actually used.

        The default accepts no weights. Methods with ``WEIGHTS`` override it (and may fall back to weights
        shipped with the package for some backbones, returning that file's path so that it is hashed).
        """
        if weights_path is not None:
            raise ConfigError(f"method {self.name!r} takes no --method-weights (got {weights_path})")
        return None

    def require_weights(self, backbone: Backbone, weights_path: Optional[str]) -> str:
        """``weights_path``, or a clear error saying that this method needs ``--method-weights`` and what."""
        if weights_path is None:
            what = f": {self.WEIGHTS_HELP}" if self.WEIGHTS_HELP else ""
            raise WeightsError(f"method {self.name!r} on backbone {backbone.spec.id!r} needs --method-weights{what}")
        return weights_path

    # -- the places a method may touch (implement those named in TOUCHES) ---------------------------
    def vision(self, backbone: Backbone) -> Backbone:
        """``backbone``: the vision stages to run instead of ``backbone``'s (e.g. a student with its own
        weights). Called once, after :meth:`bind`; the returned module belongs to this method."""
        raise NotImplementedError

    def add_tokens(self, backbone: Backbone, tokens: Tokens) -> Tokens:
        """``tokens``: insert tokens after the embedding, before the pre-norm (use ``tokens.insert``)."""
        raise NotImplementedError

    def layer_hooks(self, backbone: Backbone) -> Dict[int, LayerHook]:
        """``layers``: block index -> hook on that block's MLP hidden units (post-non-linearity)."""
        raise NotImplementedError

    def last_block(self, backbone: Backbone, parts: BlockParts, tokens: Tokens) -> torch.Tensor:
        """``last_block``: the last block's output (B, L, D) computed from its parts."""
        raise NotImplementedError

    def post_norm(self, backbone: Backbone, tokens: Tokens) -> Tokens:
        """``post_norm``: a map on the final-normed tokens (before CLIP's ``proj``)."""
        raise NotImplementedError

    def wrap(self, forward: Forward, images: torch.Tensor) -> DenseFeatures:
        """``wrapper``: dense features of ``images`` built from calls of ``forward``."""
        raise NotImplementedError


def split_composition(method: str) -> List[str]:
    """``"ttr+naclip"`` -> ``["ttr", "naclip"]`` (names as written)."""
    parts = [p.strip() for p in str(method).split("+")]
    if not method or any(not p for p in parts):
        raise ConfigError(f"--method {method!r}: empty part in a composition (write e.g. ttr+naclip)")
    return parts


def _kind_rank(part: Method) -> int:
    return min((TOUCH_KINDS.index(k) for k in part.TOUCHES), default=-1)


def check_composition(parts: Sequence[Method]) -> List[Method]:
    """Parts in canonical order (by where they act); raise for parts that cannot be combined."""
    names = [p.name for p in parts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"method {'+'.join(names)!r}: part {dup[0]!r} appears twice")
    for kind, what in (("backbone", "replace the vision weights"), ("last_block", "replace the last block"),
                       ("wrapper", "wrap the whole forward")):
        clash = [p.name for p in parts if p.touches(kind)]
        if len(clash) > 1:
            raise ConfigError(f"method {'+'.join(names)!r}: parts {clash[0]!r} and {clash[1]!r} both {what}; "
                              f"a composition takes at most one")
    if len(parts) > 1:  # vanilla is the identity: it adds nothing to a composition
        parts = [p for p in parts if p.TOUCHES] or list(parts[:1])
    return sorted(parts, key=_kind_rank)


@contextlib.contextmanager
def _hooked(parts: BlockParts, hooks: Sequence[LayerHook], tokens: Tokens) -> Iterator[None]:
    """Install ``hooks`` on the block's MLP activation for one call (chained in order)."""
    if not hooks:
        yield
        return

    def fn(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        for h in hooks:
            out = h(out, tokens)
        return out

    handle = parts.mlp_act.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


class DenseModel(nn.Module):
    """A backbone with a (possibly empty, possibly composed) cleaning method: what evaluators receive.

    Evaluators call :meth:`forward_dense` (or :func:`forward_dense_many` for a multi-method pass),
    :meth:`forward_tokens` for intermediate layers, and ``backbone.encode_text`` for CLIP ids.
    """

    def __init__(self, backbone: Backbone, parts: Sequence[Method] = (), name: str = "vanilla") -> None:
        super().__init__()
        self.backbone = backbone
        self.parts = nn.ModuleList(check_composition(list(parts)) if parts else [])
        self.name = name
        #: part name -> sha256 of its weights file (filled by harness.models when weights are bound)
        self.method_weights: Dict[str, str] = {}
        kinds: Dict[str, List[Method]] = {k: [p for p in self.parts if p.touches(k)] for k in TOUCH_KINDS}
        # the vision stages that run: the backbone's, or a method's replacement (text stays the backbone's);
        # kept out of the module tree (the backbone and the method already own it)
        object.__setattr__(self, "_vision", kinds["backbone"][0].vision(backbone) if kinds["backbone"] else backbone)
        self._token_parts = kinds["tokens"]
        self._last_rule: Optional[Method] = kinds["last_block"][0] if kinds["last_block"] else None
        self._post_parts = kinds["post_norm"]
        self._wrapper: Optional[Method] = kinds["wrapper"][0] if kinds["wrapper"] else None
        self._hook_parts = kinds["layers"]
        self._hooks: Optional[Dict[int, List[LayerHook]]] = None

    # -- identity ---------------------------------------------------------------------------------
    @property
    def vision(self) -> Backbone:
        """The vision stages that run: the backbone's, or those of a method that replaces them."""
        return self._vision  # type: ignore[attr-defined]

    @property
    def spec(self) -> BackboneSpec:
        return self.backbone.spec

    @property
    def params(self) -> Dict[str, Any]:
        """Tunable parameters: flat for one method, ``{part: {...}}`` for a composition."""
        if len(self.parts) <= 1:
            return dict(self.parts[0].params) if len(self.parts) else {}
        return {p.name: dict(p.params) for p in self.parts}

    def describe(self) -> Dict[str, Any]:
        """Method name, tunable parameters, fixed configuration and method-weights hashes (for records)."""
        if len(self.parts) <= 1:
            config: Dict[str, Any] = dict(self.parts[0].CONFIG) if len(self.parts) else {}
        else:
            config = {p.name: dict(p.CONFIG) for p in self.parts}
        return {"method": self.name, "params": self.params, "config": config,
                "method_weights": dict(self.method_weights)}

    # -- forward ------------------------------------------------------------------------------------
    def hooks(self) -> Dict[int, List[LayerHook]]:
        """Block index -> the layer hooks of every part touching it (computed once, checked against depth)."""
        if self._hooks is None:
            out: Dict[int, List[LayerHook]] = {}
            for part in self._hook_parts:
                for layer, fn in part.layer_hooks(self.vision).items():
                    out.setdefault(self.vision.block_index(int(layer)), []).append(fn)
            self._hooks = out
        return self._hooks

    def start(self, images: torch.Tensor, clean: bool = True) -> Tokens:
        """Embedding, added tokens (when ``clean``) and the pre-norm: the input of block 0."""
        tokens = self.vision.embed(images)
        if clean:
            for part in self._token_parts:
                tokens = part.add_tokens(self.vision, tokens)
        return tokens.with_x(self.vision.pre_norm(tokens.x))

    def run_blocks(self, tokens: Tokens, start: int, stop: int, clean: bool = True) -> Tokens:
        """Blocks ``start`` .. ``stop - 1`` with this model's hooks and last-block rule (when ``clean``)."""
        n = self.vision.num_blocks
        hooks = self.hooks() if clean else {}
        for i in range(start, stop):
            parts = self.vision.block(i)
            with _hooked(parts, hooks.get(i, ()), tokens):
                if clean and i == n - 1 and self._last_rule is not None:
                    x = self._last_rule.last_block(self.vision, parts, tokens)
                else:
                    x = parts.run(tokens.x)
            tokens = tokens.with_x(x)
        return tokens

    def readout(self, tokens: Tokens) -> DenseFeatures:
        """Final norm, the backbone's global token, post-norm maps, projection; added tokens dropped."""
        out = self.vision.pool(tokens.with_x(self.vision.final_norm(tokens.x)))
        for part in self._post_parts:
            out = part.post_norm(self.vision, out)
        return split_features(out.with_x(self.vision.project(out.x)))

    def _forward_plain(self, images: torch.Tensor) -> DenseFeatures:
        return self.readout(self.run_blocks(self.start(images), 0, self.vision.num_blocks))

    def forward_dense(self, images: torch.Tensor) -> DenseFeatures:
        """Normalised images (B, 3, H, W), H and W multiples of the patch size -> dense features."""
        if self._wrapper is not None:
            return self._wrapper.wrap(self._forward_plain, images)
        return self._forward_plain(images)

    def forward(self, images: torch.Tensor) -> DenseFeatures:  # nn.Module convention
        return self.forward_dense(images)

    def forward_tokens(self, images: torch.Tensor, layers: Sequence[int]) -> Dict[int, Tokens]:
        """Residual-stream tokens after each block in ``layers`` (negative = from the end), with this
        model's added tokens and hooks in place (like timm's ``forward_intermediates``). Wrappers do not
        apply: their output is not a residual stream."""
        want = sorted({self.vision.block_index(int(i)) for i in layers})
        tokens = self.start(images)
        out: Dict[int, Tokens] = {}
        done = 0
        for i in want:
            tokens = self.run_blocks(tokens, done, i + 1)
            done = i + 1
            out[i] = tokens
        return {int(layer): out[self.vision.block_index(int(layer))] for layer in layers}

    # -- sharing the trunk ----------------------------------------------------------------------------
    def shared_blocks(self) -> Optional[int]:
        """How many leading blocks this model computes exactly as the plain backbone does.

        ``None`` when even the input differs (tokens added at the input, or a wrapper that changes the
        images): such a model shares nothing with others in a multi-method pass.
        """
        if self._token_parts or self._wrapper is not None or self.vision is not self.backbone:
            return None
        n = self.vision.num_blocks
        touched = set(self.hooks())
        if self._last_rule is not None:
            touched.add(n - 1)
        return min(touched, default=n)

    def continue_from(self, tokens: Tokens, block: int) -> DenseFeatures:
        """Finish the forward from plain-trunk ``tokens`` after ``block`` blocks (see :meth:`shared_blocks`)."""
        return self.readout(self.run_blocks(tokens, block, self.vision.num_blocks))


def forward_dense_many(models: Sequence[DenseModel], images: torch.Tensor) -> List[DenseFeatures]:
    """Dense features of several models, computing the common prefix of the forward once per backbone.

    Models on one backbone that leave the first ``k`` blocks untouched (:meth:`DenseModel.shared_blocks`)
    share the plain embedding and those blocks; the trunk advances to each model's first touched block
    in turn. A model that changes the input runs on its own.
    """
    out: List[Optional[DenseFeatures]] = [None] * len(models)
    groups: Dict[int, List[int]] = {}
    for i, m in enumerate(models):
        if m.shared_blocks() is None:
            out[i] = m.forward_dense(images)
        else:
            groups.setdefault(id(m.vision), []).append(i)
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = models[idx[0]].forward_dense(images)
            continue
        order = sorted(idx, key=lambda i: models[i].shared_blocks())  # type: ignore[arg-type, return-value]
        trunk_model = models[order[0]]
        trunk = trunk_model.start(images, clean=False)
        done = 0
        for i in order:
            k = int(models[i].shared_blocks())  # type: ignore[arg-type]
            trunk = trunk_model.run_blocks(trunk, done, k, clean=False)
            done = k
            out[i] = models[i].continue_from(trunk, k)
    return [o for o in out if o is not None]

"""A frozen timm VisionTransformer that accepts prompts: prompt tuning (extra tokens) and prefix tuning
(extra keys and values inside chosen attention layers).

Why a wrapper and not a copy of timm's ViT: the pretrained weights, patch embedding, position
embedding and blocks stay timm's own modules, called through timm's own methods
(``patch_embed``, ``_pos_embed``, ``norm_pre``, each ``Block``, ``norm``). Only two things are added:

- **prompt tuning**: ``L`` learnable tokens are inserted after the prefix tokens ([CLS], registers)
  and before the patch tokens, once, after the position embedding (L2P), so they pass every block;
- **prefix tuning**: every timm ``Attention`` is wrapped in :class:`PrefixAttention`, which runs the
  original module unchanged when no prefix is set and otherwise computes
  ``Attn(Q, [p_K; K], [p_V; V])`` with the original ``qkv`` / ``q_norm`` / ``k_norm`` / ``proj``
  weights. Queries and sequence length are unchanged.

The *query* of the prompt methods is :meth:`PromptViT.query`: the final [CLS] embedding (after the
final LayerNorm) of the same frozen network without any prompt, under ``no_grad``: a second forward
pass per image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from clframe.errors import ConfigError

Prefix = tuple[Tensor, Tensor]
"""Keys and values prepended in one attention layer, each ``(batch, length, attn_dim)``."""


def split_prefix(p: Tensor) -> Prefix:
    """The prefix-tuning convention: the first half of a prompt's rows are keys, the second half values."""
    length = p.shape[-2]
    if length % 2:
        raise ConfigError(f"a prefix prompt needs an even length (keys + values), got {length}")
    return p[..., : length // 2, :], p[..., length // 2 :, :]


def cat_prefixes(*prefixes: Prefix | None) -> Prefix | None:
    """Concatenate prefixes applied at the same layer (DualPrompt's G and E prompts): keys with keys, values with values."""
    given = [p for p in prefixes if p is not None]
    if not given:
        return None
    if len(given) == 1:
        return given[0]
    batch = max(t.shape[0] for p in given for t in p)  # shared prompts have batch 1
    keys = torch.cat([p[0].expand(batch, -1, -1) for p in given], dim=1)
    values = torch.cat([p[1].expand(batch, -1, -1) for p in given], dim=1)
    return keys, values


class PrefixAttention(nn.Module):
    """timm ``Attention`` with optional key/value prefixes (prefix tuning).

    ``prefix`` is set by :class:`PromptViT` just for the call of its block and cleared afterwards, so
    a block called any other way behaves exactly like timm's. The wrapped module's weights are used
    as they are; its ``forward`` runs whenever there is no prefix.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        for name in ("qkv", "num_heads", "head_dim", "proj"):
            if not hasattr(inner, name):
                raise ConfigError(f"prefix tuning needs a timm Attention with a fused qkv projection; "
                                  f"{type(inner).__name__} has no {name!r}")
        self.inner = inner
        self.prefix: Prefix | None = None

    @property
    def attn_dim(self) -> int:
        return int(getattr(self.inner, "attn_dim", self.inner.num_heads * self.inner.head_dim))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if self.prefix is None:
            return self.inner(x, attn_mask=attn_mask, is_causal=is_causal)
        if is_causal:
            raise ConfigError("prefix tuning with causal attention is not supported")
        a, (pk, pv) = self.inner, self.prefix
        b, n, _ = x.shape
        heads, head_dim = a.num_heads, a.head_dim
        q, k, v = a.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        # prefixes live in the projected key/value space (after qkv, as in the reference implementations)
        pk = pk.expand(b, -1, -1).reshape(b, -1, heads, head_dim).transpose(1, 2).to(k.dtype)
        pv = pv.expand(b, -1, -1).reshape(b, -1, heads, head_dim).transpose(1, 2).to(v.dtype)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        if attn_mask is not None:  # every query may attend to every prefix position
            pad = (pk.shape[2], 0)
            attn_mask = F.pad(attn_mask, pad, value=True) if attn_mask.dtype == torch.bool else F.pad(attn_mask, pad)
        drop = a.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        out = out.transpose(1, 2).reshape(b, n, self.attn_dim)
        out = a.norm(out) if hasattr(a, "norm") else out
        gate = getattr(a, "gate", None)
        if gate is not None:
            out = out * gate(x).sigmoid()
        return a.proj_drop(a.proj(out))


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A plain or wrapped state dict (``state_dict`` / ``model`` keys and DDP prefixes, as timm's own loader reads
    them), or a clframe model's state dict, whose ViT weights sit under ``backbone.`` (``backbone.vit.`` for a
    prompt strategy, with its attention layers wrapped)."""
    from timm.models import load_state_dict

    state = load_state_dict(str(path), use_ema=False)
    if not any(k.startswith("patch_embed.") for k in state):
        for prefix in ("backbone.vit.", "backbone.body.", "backbone.", "model.", "vit."):
            if any(k.startswith(prefix + "patch_embed.") for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                break
    return {k.replace(".attn.inner.", ".attn."): v for k, v in state.items()}


def load_vit_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load local weights into a timm ViT, strictly: a checkpoint that does not fit fails loudly.

    ``.npz`` files (Google's JAX checkpoints) go through timm's own converter; other files are read as
    state dicts, the classifier is dropped (the strategies train their own head) and timm's ViT
    checkpoint filter resamples the position embedding when the image size differs.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint_path {str(path)!r} is not a file: give the path of a saved timm ViT state "
                          "dict (.pt/.pth/.safetensors/.npz), or use pretrained=true with network access")
    if path.suffix == ".npz":
        model.load_pretrained(str(path))
        return
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = _read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    state = checkpoint_filter_fn(state, model)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = {k for k in model.state_dict() if not k.startswith("head.")}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise ConfigError(f"the checkpoint {str(path)!r} does not fit the ViT built from the config (missing: "
                          f"{missing[:5]}{'...' if len(missing) > 5 else ''}; unexpected: {unexpected[:5]}"
                          f"{'...' if len(unexpected) > 5 else ''}): set backbone and backbone_kwargs (depth, "
                          "embed_dim, num_heads, patch_size, img_size) to those it was trained with")
    model.load_state_dict(state, strict=False)


class PromptViT(nn.Module):
    """Frozen timm ViT whose forward takes prompts, plus the prompt-free query pass.

    Args:
        model_name: a timm VisionTransformer name (``vit_base_patch16_224``; a ``timm:`` prefix is accepted).
        in_chans: input channels.
        pretrained: load timm's pretrained weights (needs network access or timm's cache).
        checkpoint_path: load these local weights instead (see :func:`load_vit_checkpoint`).
        mean, std: per-channel normalisation applied after resizing (``None``: the input is used as given,
            i.e. as the data module normalised it; the L2P reference protocol feeds pixels in [0, 1]).
        **create_kwargs: timm ``create_model`` arguments (``img_size``, ``patch_size``, ``depth``,
            ``embed_dim``, ``num_heads``, ...).

    Inputs whose size differs from the model's ``img_size`` are resized (bilinear) on the device, so
    32 px CIFAR feeds a 224 px ViT-B/16 without a data-side transform.
    """

    def __init__(self, model_name: str, in_chans: int = 3, pretrained: bool = False, checkpoint_path: str | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, **create_kwargs: Any) -> None:
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer

        name = model_name.split(":", 1)[1] if model_name.startswith("timm:") else model_name
        load_hub = pretrained and checkpoint_path is None
        try:
            vit = timm.create_model(name, pretrained=load_hub, num_classes=0, in_chans=in_chans, **create_kwargs)
        except (RuntimeError, OSError, ConnectionError) as err:
            if not load_hub:
                raise
            raise ConfigError(f"could not load timm's pretrained weights for {name!r} ({err}). Without network "
                              "access, save the weights once and pass checkpoint_path=<file> (pretrained is then "
                              "ignored), or set pretrained=false for a random backbone (tests only)") from err
        if not isinstance(vit, VisionTransformer):
            raise ConfigError(f"{name!r} is a {type(vit).__name__}, not a timm VisionTransformer; the prompt "
                              "methods need a ViT with a [CLS] token (e.g. vit_base_patch16_224)")
        if vit.cls_token is None:
            raise ConfigError(f"{name!r} has no [CLS] token: the query and the classifier of the prompt methods read it")
        if checkpoint_path is not None:
            load_vit_checkpoint(vit, checkpoint_path)
        for blk in vit.blocks:
            blk.attn = PrefixAttention(blk.attn)
        vit.requires_grad_(False)
        vit.eval()
        self.vit = vit
        self.num_features = int(vit.embed_dim)
        self.depth = len(vit.blocks)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        size = vit.patch_embed.img_size
        self.image_size: tuple[int, int] | None = None if getattr(vit, "dynamic_img_size", False) else tuple(size)
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std for the backbone's input normalisation, or neither")
        norm = mean is not None
        self.register_buffer("mean", torch.tensor(mean if norm else [0.0] * in_chans).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std if norm else [1.0] * in_chans).view(1, -1, 1, 1), persistent=False)
        self._normalize = norm

    def train(self, mode: bool = True) -> PromptViT:
        """Always in eval mode: the backbone is frozen, so no dropout or stochastic depth."""
        return super().train(False)

    def prepare(self, x: Tensor) -> Tensor:
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std if self._normalize else x

    def forward_tokens(self, x: Tensor, prompts: Tensor | None = None, prefixes: Mapping[int, Prefix] | None = None) -> Tensor:
        """The final token sequence (after the final LayerNorm) of a prompted forward.

        Args:
            x: images (already normalised as the data module does it).
            prompts: ``(batch, L, dim)`` tokens inserted after the prefix tokens ([CLS]) at the input.
            prefixes: block index -> (keys, values), each ``(batch or 1, length, dim)``.
        """
        vit = self.vit
        h = vit.patch_embed(self.prepare(x))
        h = vit._pos_embed(h)
        h = vit.patch_drop(h)
        h = vit.norm_pre(h)
        if prompts is not None:
            npt = self.num_prefix_tokens
            h = torch.cat([h[:, :npt], prompts.expand(len(h), -1, -1).to(h.dtype), h[:, npt:]], dim=1)
        prefixes = prefixes or {}
        bad = [i for i in prefixes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"prompt layers {bad} are out of range for a ViT with {self.depth} blocks")
        for i, blk in enumerate(vit.blocks):
            prefix = prefixes.get(i)
            if prefix is None:
                h = blk(h)
                continue
            blk.attn.prefix = prefix
            try:
                h = blk(h)
            finally:
                blk.attn.prefix = None
        return vit.norm(h)

    @torch.no_grad()
    def query(self, x: Tensor) -> Tensor:
        """``q(x)``: the final [CLS] embedding of the frozen backbone without prompts, detached."""
        return self.forward_tokens(x)[:, 0]

    def forward(self, x: Tensor) -> Tensor:
        """The plain (prompt-free) [CLS] feature, so the wrapper also works as an ordinary backbone."""
        return self.forward_tokens(x)[:, 0]

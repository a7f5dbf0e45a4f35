"""``torch.nn`` modules built on subquad's ops.

``BiLevelRoutingAttention``: BiFormer's attention block (qkv projection, region routing, routed
token attention, LePE, output projection) on ``subquad.bilevel_routing_attention``, which reads
K/V where they lie instead of gathering the routed regions' tokens.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ._checks import check_backend, check_int, check_scale
from .routing import bilevel_routing_attention, check_region_args

__all__ = ["BiLevelRoutingAttention"]


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention block (BiFormer), input and output ``[B, Hi, Wi, C]``.

    ``y = proj(attn(q, k, v) + lepe(v))`` with ``q, k, v = qkv(x)`` split into ``num_heads`` heads
    of ``C / num_heads`` channels; ``attn`` = ``subquad.bilevel_routing_attention`` with shared
    routing (one routing for all heads, region affinity summed over heads: BiFormer's
    channel-wide region query/key product), ``num_regions`` regions per dim and ``topk`` routed
    regions; ``lepe`` = a depthwise ``side_dwconv x side_dwconv`` convolution over V (zero
    padding, with bias; none when ``side_dwconv == 0``).

    Args:
        dim: channels C (a multiple of num_heads).
        num_heads: heads.
        num_regions: regions per spatial dim (BiFormer's n_win): an int or (S_h, S_w).
        topk: regions routed per region.
        qk_scale: the attention scale; default ``(C / num_heads) ** -0.5`` (per-head, the usual
            convention). BiFormer's released models used the full channel dim, ``C ** -0.5``:
            pass ``qk_scale=dim ** -0.5`` to match them.
        side_dwconv: LePE kernel size (odd), 0 for no LePE.
        qkv_bias: bias in the qkv projection.
        backend: passed to ``bilevel_routing_attention`` ("auto": Triton on CUDA).

    BiFormer's weights load as they are: ``load_state_dict`` takes the key names of BiFormer's
    ``BiLevelRoutingAttention`` (``qkv.qkv.*``, ``wo.*``, ``lepe.*``) as well as this module's
    (``qkv.*``, ``proj.*``, ``lepe.*``), also inside a larger model's state dict. Build the block
    with BiFormer's ``dim, num_heads, n_win (num_regions), topk, side_dwconv, qkv_bias`` and
    ``qk_scale=dim ** -0.5``: on sizes divisible by n_win it then computes what BiFormer's block
    computes (the released configuration: ``param_attention="qkvo"``, ``kv_downsample_mode=
    "identity"``, no routing parameters; a state dict holding routing weights, ``router.*``, is
    refused: that routing is not this one).

    Differences from BiFormer's released code, by design: sizes not divisible by num_regions
    are not zero-padded into the routing and the softmax (region means count real tokens only,
    padded keys take part in no softmax); the routing is not differentiable (as in the released
    models: ``param_routing=False, diff_routing=False``, no routing weights).
    """

    def __init__(self, dim: int, num_heads: int = 8, num_regions: Union[int, Sequence[int]] = 7, topk: int = 4,
                 qk_scale: Optional[float] = None, side_dwconv: int = 5, qkv_bias: bool = False,
                 backend: str = "auto"):
        super().__init__()
        dim, num_heads = check_int("dim", dim, 1), check_int("num_heads", num_heads, 1)
        side_dwconv = check_int("side_dwconv", side_dwconv, 0)
        if dim % num_heads != 0:
            raise ValueError(f"dim must be a multiple of num_heads, got dim={dim}, num_heads={num_heads}")
        if side_dwconv and side_dwconv % 2 == 0:
            raise ValueError(f"side_dwconv must be 0 or an odd kernel size, got {side_dwconv}")
        # what does not depend on the input size is checked here, not at the first forward
        _, topk = check_region_args((1 << 62, 1 << 62), num_regions, topk)
        check_backend(backend)
        self.dim, self.num_heads, self.topk = dim, num_heads, topk
        self.num_regions = num_regions
        self.head_dim = dim // num_heads
        qk_scale = check_scale(qk_scale, positive=True, name="qk_scale")
        self.scale = self.head_dim ** -0.5 if qk_scale is None else qk_scale
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = (nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
                     if side_dwconv > 0 else None)
        self.proj = nn.Linear(dim, dim)
        self.register_load_state_dict_pre_hook(_biformer_keys)

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        """x ``[B, Hi, Wi, C]`` -> ``[B, Hi, Wi, C]`` (and the routing ``[B, R, topk]`` if asked)."""
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, Hi, Wi, C={self.dim}], got shape {tuple(x.shape)}")
        B, Hi, Wi, C = x.shape
        q, k, v = self.qkv(x).reshape(B, Hi, Wi, 3, self.num_heads, self.head_dim).unbind(3)
        out = bilevel_routing_attention(q, k, v, num_regions=self.num_regions, topk=self.topk, scale=self.scale,
                                        routing="shared", backend=self.backend, return_routing=return_routing)
        o, idx = out if return_routing else (out, None)
        o = o.reshape(B, Hi, Wi, C)
        if self.lepe is not None:
            o = o + self.lepe(v.reshape(B, Hi, Wi, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = self.proj(o)
        return (y, idx) if return_routing else y

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_regions={self.num_regions}, topk={self.topk}, "
                f"scale={self.scale:.4g}, backend={self.backend!r}")


_BIFORMER_NAMES = {"qkv.qkv.": "qkv.", "wo.": "proj."}  # BiFormer's key prefix -> this module's


def _biformer_keys(module, state_dict, prefix, *_):
    """Renames BiFormer's keys of this block in ``state_dict`` (in place, before loading)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        if local.startswith("router."):
            raise ValueError(f"{key}: BiFormer's parametric routing (param_routing=True) has no counterpart here; "
                             "subquad routes on the region means of q and k with no weights")
        for old, new in _BIFORMER_NAMES.items():
            if local.startswith(old):
                state_dict[prefix + new + local[len(old):]] = state_dict.pop(key)
                break

"""subquad: Triton kernels for sub-quadratic attention, each beside a PyTorch reference.

Families: lightning (linear) attention (``lightning_attention``), neighborhood / generalized
neighborhood attention (``neighborhood_attention``, ``na1d/2d/3d``), HiP tree-pruned top-k
attention (``hip_attention``, ``hip_mask``) and bi-level routing attention
(``bilevel_routing_attention``, the block ``subquad.nn.BiLevelRoutingAttention``). Every op takes
``backend="auto" | "triton" | "reference"``; auto runs Triton on CUDA tensors and the reference on
CPU tensors.
Importing subquad initialises no GPU and compiles nothing.
"""

from .lightning import lightning_attention, lightning_slopes
from .neighborhood import na1d, na2d, na3d, neighborhood_attention, neighborhood_speedup_bound
from .hip import HipMask, hip_attention, hip_mask
from .routing import bilevel_routing_attention
from . import nn  # noqa: F401  (subquad.nn.BiLevelRoutingAttention)

__version__ = "0.1.0"
__all__ = [
    "lightning_attention", "lightning_slopes",
    "neighborhood_attention", "na1d", "na2d", "na3d", "neighborhood_speedup_bound",
    "hip_attention", "hip_mask", "HipMask",
    "bilevel_routing_attention",
]

"""Config spaces, interpreter-safe config choice, on-disk tuning cache, static compile check.

CLI: ``python -m subquad.autotune check`` (compile every kernel x config for sm_80 / sm_90 and
report registers, spills, shared memory and tensor-core instructions), ``python -m
subquad.autotune cache`` (show the tuning cache).
"""

from .tuner import Config, Tuner, interpreting, cache_path, bench_launch
from . import spaces

__all__ = ["Config", "Tuner", "interpreting", "cache_path", "bench_launch", "spaces"]

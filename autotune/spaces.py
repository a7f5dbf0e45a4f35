"""Config spaces of every kernel, in one place.

Order matters: the first config valid for a shape bucket is the default (used under the
interpreter and when tuning is off), so each space starts with a config that compiles without
spills on sm_80 and sm_90 for every head dim it accepts (checked by ``python -m subquad.autotune
check``). Buckets never contain the sequence length.
"""

from .tuner import Config, Tuner


def pow2(n: int) -> int:
    """Padded block size of a dimension: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (int(n) - 1).bit_length())


def _c(num_warps=4, num_stages=2, **kw) -> Config:
    return Config(kw, num_warps, num_stages)


def _state_fits(cfg: Config, bucket: tuple, per_thread: int) -> bool:
    """The fp32 state tile BK x BV lives in registers: keep it to ``per_thread`` floats a thread.
    BV is clamped to the padded V by the launchers, so the clamped width is what counts."""
    _, K, V = bucket[:3]
    bv = min(cfg.kw["BV"], pow2(V))
    return pow2(K) * bv <= per_thread * 32 * cfg.num_warps


# Lightning attention; bucket = (dtype name, K, V, has_decay).
LIGHTNING_FWD = Tuner(
    "lightning_fwd",
    [
        _c(4, 2, BT=64, BV=64),
        _c(8, 2, BT=64, BV=64),
        _c(4, 2, BT=64, BV=32),
        _c(8, 2, BT=64, BV=128),
        _c(4, 3, BT=64, BV=64),
        _c(4, 2, BT=32, BV=64),
        _c(8, 2, BT=64, BV=32),
        _c(4, 1, BT=64, BV=32),
    ],
    lambda cfg, b: _state_fits(cfg, b, 64),
)

LIGHTNING_RECURRENT = Tuner(
    "lightning_recurrent",
    [
        _c(4, 1, BV=32),
        _c(4, 1, BV=16),
        _c(8, 1, BV=64),
        _c(2, 1, BV=16),
    ],
    lambda cfg, b: _state_fits(cfg, b, 64),
)

LIGHTNING_BWD_DQ = Tuner(
    "lightning_bwd_dq",
    [
        _c(4, 2, BT=64, BV=64),
        _c(8, 2, BT=64, BV=64),
        _c(4, 2, BT=64, BV=32),
        _c(8, 2, BT=64, BV=128),
        _c(4, 2, BT=32, BV=64),
        _c(8, 2, BT=64, BV=32),
    ],
    lambda cfg, b: _state_fits(cfg, b, 64),
)

LIGHTNING_BWD_DKDV = Tuner(
    "lightning_bwd_dkdv",
    [
        _c(4, 2, BT=64, BV=32),
        _c(8, 2, BT=64, BV=64),
        _c(4, 2, BT=64, BV=64),
        _c(8, 2, BT=64, BV=32),
        _c(4, 2, BT=32, BV=32),
        _c(8, 1, BT=64, BV=64),
    ],
    lambda cfg, b: _state_fits(cfg, b, 32),
)

ALL = [LIGHTNING_FWD, LIGHTNING_RECURRENT, LIGHTNING_BWD_DQ, LIGHTNING_BWD_DKDV]

"""Config choice for every kernel: one place, interpreter-safe, cached on disk.

Why not `@triton.autotune`: it fails at launch under the interpreter when it has more than one
config, it keys on arguments we do not want as keys (sequence length must never trigger a
re-tune or a recompile), and its choices die with the process. Here:

* under ``TRITON_INTERPRET=1`` (or ``SUBQUAD_AUTOTUNE=0``) the first valid config of the space
  (after the configs ``first`` puts ahead for the bucket's dtype) is used, with no timing;
* on a GPU, the first call for a (kernel, shape bucket) times every valid config of the space
  with ``triton.testing.do_bench`` on the real launch, drops configs that fail to compile (a
  config that spills registers is timed like any other: a spill outside the main loop costs
  nothing per step, one inside shows in the time; the cache notes it), and stores the winner
  in a JSON file keyed by (GPU name, triton version, digest of the kernels' source, kernel,
  bucket), so a second process does not tune again and changed kernels are tuned afresh; a bucket
  first met while a CUDA graph is being captured runs the default (timing would break the capture).

The cache lives in ``$SUBQUAD_CACHE_DIR`` (default ``~/.cache/subquad``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

__all__ = ["Config", "Tuner", "interpreting", "cache_path"]


@dataclass(frozen=True)
class Config:
    """Compile-time block sizes (``kw``) plus launch options of one kernel variant."""

    kw: Dict[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2

    def __hash__(self):
        return hash((tuple(sorted(self.kw.items())), self.num_warps, self.num_stages))

    def name(self) -> str:
        parts = [f"{k}{v}" for k, v in sorted(self.kw.items())]
        return "_".join(parts + [f"w{self.num_warps}", f"s{self.num_stages}"])

    def to_json(self) -> dict:
        return {"kw": dict(self.kw), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @staticmethod
    def from_json(d: dict) -> "Config":
        return Config(dict(d["kw"]), int(d["num_warps"]), int(d["num_stages"]))


def env_flag(name: str, default: bool = False) -> bool:
    """A boolean environment variable read as Triton reads its own: "1", "true", "yes", "on"
    (any case) are on, anything else set is off ("0", "false", "off", "no", "")."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on", "y")


def interpreting() -> bool:
    return env_flag("TRITON_INTERPRET")


def _tuning_enabled() -> bool:
    return not interpreting() and env_flag("SUBQUAD_AUTOTUNE", True)


def cache_path() -> str:
    root = os.environ.get("SUBQUAD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "subquad")
    return os.path.join(root, "autotune.json")


@functools.lru_cache(maxsize=1)
def _code_tag() -> str:
    """A digest of the kernels' source (``subquad/kernels/*.py``): a choice timed on other kernel
    code is stale (an upgrade that changes a kernel's step changes which tile wins), so it is not
    reused."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    digest = hashlib.sha1()
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:10]


def _capturing() -> bool:
    """A CUDA graph is being captured (a bucket first met inside a capture, not in its warm-up)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _device_tag(device) -> str:
    import torch
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}|triton-{triton.__version__}|kernels-{_code_tag()}"


class Tuner:
    """Chooses one config of ``space`` per shape bucket.

    ``valid(cfg, bucket) -> bool`` filters the space for a bucket (e.g. block sizes larger than
    the padded head dim are pointless). The space order matters: the first valid config is the
    default, used whenever no timing is done.
    """

    _lock = threading.Lock()
    _disk: Optional[dict] = None  # whole cache file, loaded once per process

    def __init__(self, kernel: str, space: Iterable[Config], valid: Callable[[Config, tuple], bool] = None,
                 first: Optional[Dict[str, Iterable[Config]]] = None, keys_tf32: bool = True):
        self.kernel = kernel
        # whether fp32 buckets under torch's TF32 setting are keyed "tf32" (``dtype_key``); False for
        # kernels whose dots stay IEEE whatever the setting (HiP's selection: its ranking)
        self.keys_tf32 = keys_tf32
        self.space: List[Config] = list(dict.fromkeys(space))  # order kept, repeats dropped
        self.valid = valid or (lambda cfg, bucket: True)
        # {dtype key: configs}: for buckets of that dtype (bucket[0]) these come before the space,
        # so the default differs: fp32's FMA dots and tf32's 4-byte operands hold more registers
        # than the 16-bit dots the space's first configs were chosen for, and spill with them
        self.first = {key: list(cfgs) for key, cfgs in (first or {}).items()}
        self._memo: Dict[tuple, Config] = {}
        self._defaults: Dict[tuple, Config] = {}

    def candidates(self, bucket: tuple) -> List[Config]:
        head = self.first.get(bucket[0], []) if bucket else []
        cands = [c for c in dict.fromkeys(head + self.space) if self.valid(c, bucket)]
        if not cands:
            raise RuntimeError(f"subquad: no config of {self.kernel} fits bucket {bucket}")
        return cands

    def configs(self) -> List[Config]:
        """Every config this tuner may run for some bucket: the ``first`` ones, then the space."""
        return list(dict.fromkeys([c for cfgs in self.first.values() for c in cfgs] + self.space))

    def default(self, bucket: tuple) -> Config:
        if bucket not in self._defaults:  # launchers ask per call: filtering the space costs us
            self._defaults[bucket] = self.candidates(bucket)[0]
        return self._defaults[bucket]

    def choose(self, bucket: tuple, device, bench: Callable[[Config], float]) -> Config:
        """``bench(cfg)`` launches the real call with ``cfg`` and returns a time in ms."""
        bucket = tuple(bucket)
        memo = (bucket, getattr(device, "type", "cpu"), getattr(device, "index", None))  # per GPU of a process
        if memo in self._memo:
            return self._memo[memo]
        if not _tuning_enabled() or memo[1] != "cuda":
            cfg = self.default(bucket)
            self._memo[memo] = cfg
            return cfg
        key = f"{_device_tag(device)}|{self.kernel}|{'-'.join(map(str, bucket))}"
        cfg = self._cached(self._load().get(key), bucket)
        if cfg is None and _capturing():  # timing syncs, which breaks a CUDA graph capture: the default, not kept
            return self.default(bucket)
        if cfg is None:
            cfg, timings = self._tune(bucket, bench)
            self._store(key, {"config": cfg.to_json(), "ms": timings})
        self._memo[memo] = cfg
        return cfg

    def forget_choices(self) -> None:
        """Drop this process's choices (the disk cache stays): the next ``choose`` per bucket looks
        again, e.g. with tuning switched back on after calls that ran the defaults."""
        self._memo.clear()

    def chosen(self, bucket: tuple, device) -> Optional[Config]:
        """The config ``choose`` picked for ``bucket`` on ``device`` in this process, or None if the
        kernel has not run there yet (benchmarks report the tiles that ran, not the default's)."""
        return self._memo.get((tuple(bucket), getattr(device, "type", "cpu"), getattr(device, "index", None)))

    def _cached(self, entry, bucket) -> Optional[Config]:
        """The config of a cache entry if it is one of this bucket's candidates now (a malformed
        entry, or a config the space no longer holds for the bucket, is tuned again)."""
        try:
            cfg = Config.from_json(entry["config"])
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        return next((c for c in self.candidates(bucket) if c.name() == cfg.name()), None)

    def _tune(self, bucket, bench):
        timings = {}
        best, best_ms = None, float("inf")
        for cfg in self.candidates(bucket):
            try:
                ms = float(bench(cfg))
                timings[cfg.name()] = ms
            except Spilled as exc:  # correct; its time says what the spill costs
                ms = exc.ms
                timings[cfg.name()] = f"spills: {ms:.4f} ms"
            except Exception as exc:  # out of shared memory, compile failure: not a candidate
                timings[cfg.name()] = f"failed: {type(exc).__name__}"
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        if best is None:
            raise RuntimeError(f"subquad: every config of {self.kernel} failed for bucket {bucket}: {timings}")
        return best, timings

    @classmethod
    def _load(cls) -> dict:
        with cls._lock:
            if cls._disk is None:
                try:
                    with open(cache_path()) as f:
                        cls._disk = json.load(f)
                except (OSError, ValueError):
                    cls._disk = {}
                if not isinstance(cls._disk, dict):  # valid JSON of another shape: ignored
                    cls._disk = {}
            return cls._disk

    @classmethod
    def _store(cls, key: str, entry: dict) -> None:
        with cls._lock:
            path = cache_path()
            try:
                with open(path) as f:
                    disk = json.load(f)  # merge with what other processes wrote meanwhile
            except (OSError, ValueError):
                disk = {}
            if not isinstance(disk, dict):
                disk = {}
            disk.update(cls._disk or {})
            disk[key] = entry
            cls._disk = disk
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump(disk, f, indent=1, sort_keys=True)
                    os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a shared cache directory private
                    os.replace(tmp, path)  # atomic: readers never see half a file
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
            except OSError:
                pass  # a read-only home only costs re-tuning in the next process

    @classmethod
    def forget_memory(cls) -> None:
        """Drop the in-process copy of the disk cache (tests use this to simulate a new process)."""
        with cls._lock:
            cls._disk = None


class Spilled(RuntimeError):
    """A config that compiled with register spills: runs correctly, ``ms`` its time. The tuner
    weighs it by that time like any other and notes the spill in the cache."""

    def __init__(self, ms: float):
        super().__init__(f"register spills ({ms:.4f} ms)")
        self.ms = ms


def bench_launch(launch: Callable[[], None]) -> float:
    """Median ms of ``launch`` with CUDA events; a config that spills registers raises ``Spilled``."""
    from triton.testing import do_bench

    compiled = launch()
    ms = do_bench(launch, warmup=5, rep=20, return_mode="median")
    if compiled is not None and getattr(compiled, "n_spills", 0):
        raise Spilled(ms)
    return ms

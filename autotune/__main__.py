"""``python -m subquad.autotune {check,cache}``.

check   compile every kernel x config for sm_80 / sm_90 without a GPU and report registers,
        spills, shared memory and tensor-core instructions (see ``subquad.autotune.check``);
        exit code 1 when a default config fails.
cache   show the on-disk tuning cache (``--clear`` deletes it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from .tuner import cache_path


def _cache(args: argparse.Namespace) -> int:
    path = cache_path()
    if args.clear:
        try:
            os.remove(path)
            print(f"removed {path}")
        except FileNotFoundError:
            print(f"no cache at {path}")
        return 0
    print(path)
    try:
        with open(path) as f:
            entries = json.load(f)
    except FileNotFoundError:
        print("(no cache file)")
        return 0
    except (OSError, ValueError) as exc:
        print(f"(unreadable cache file: {exc})")
        return 1
    if not isinstance(entries, dict) or not entries:
        print("(empty)")
        return 0
    if args.json:
        print(json.dumps(entries, indent=1, sort_keys=True))
        return 0
    print(f"{len(entries)} entries")
    for key in sorted(entries):
        entry = entries[key] if isinstance(entries[key], dict) else {}
        cfg = entry.get("config", {})
        desc = " ".join(f"{k}={v}" for k, v in sorted(cfg.get("kw", {}).items()))
        desc += f" num_warps={cfg.get('num_warps')} num_stages={cfg.get('num_stages')}"
        ms = entry.get("ms", {})
        times = [v for v in ms.values() if isinstance(v, (int, float))] if isinstance(ms, dict) else []
        best = f"  best {min(times):.4f} ms of {len(ms)} tried" if times else ""
        print(f"{key}: {desc}{best}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import check

    p = argparse.ArgumentParser(prog="python -m subquad.autotune", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pc = sub.add_parser("check", help="static compile check of every kernel config (no GPU needed)",
                        description=check.__doc__.split("\n\n")[0])
    check.add_arguments(pc)
    pk = sub.add_parser("cache", help="show or clear the on-disk tuning cache")
    pk.add_argument("--clear", action="store_true", help="delete the cache file")
    pk.add_argument("--json", action="store_true", help="print the raw JSON")
    args = p.parse_args(argv)
    if args.cmd == "check":
        args._argv = argv[argv.index("check") + 1:]
        return check.run(args)
    return _cache(args)


if __name__ == "__main__":
    sys.exit(main())

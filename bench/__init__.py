"""Benchmarks of subquad: one module per attention family, shared helpers in ``bench.common``.

``python -m bench`` checks every family's Triton kernel against its reference and prints a quick
speed table; ``python bench/<family>.py`` runs one family's full benchmark. See bench/README.md.
"""

# The families ``python -m bench`` runs, in order: each is a module ``bench.<name>`` with
# ``check() -> list[dict]`` and ``run(quick: bool, out_dir: str) -> dict``.
FAMILIES = ["lightning", "neighborhood", "hip", "routing"]

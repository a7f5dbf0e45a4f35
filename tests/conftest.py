"""Test setup: the Triton interpreter when no GPU is present (set before any kernel import),
NaN-poisoned kernel outputs, the `gpu` marker."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["SUBQUAD_POISON"] = "1"  # kernel outputs start as NaN: unwritten elements fail

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Every test draws the same random numbers whatever the order or selection of tests."""
    torch.manual_seed(0)

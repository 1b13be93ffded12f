"""Shared test fixtures.

On a machine without CUDA, Triton's kernels (the fast merge, :mod:`compressor.merge.fast`) run
through Triton's CPU interpreter, so that the same kernel code is tested in CI. The switch must be
set before Triton is first imported (timm imports it), hence here, before anything else.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread beats two threads fighting over a shared CPU (10x here).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

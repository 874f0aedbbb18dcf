import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU under the interpreter. Set before anything imports triton
    # (transformers does): triton reads the variable once.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fp32_matmuls_stay_exact():
    """Every test starts with full-precision fp32 matmuls, so that a library an earlier test
    imported (torchao, timm) cannot leave TF32 on: the fp32 comparisons at 1e-4 assume cuBLAS's
    exact products. (After a library set torch's newer per-backend precision, the legacy call
    raises: the newer one then says the same.)"""
    try:
        torch.set_float32_matmul_precision("highest")
    except RuntimeError:
        torch.backends.cuda.matmul.fp32_precision = "ieee"

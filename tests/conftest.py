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
    """Every test starts with full-precision fp32 matmuls, and a library that a test imports
    (torchao, timm) cannot leave TF32 on for the tests after it: the fp32 comparisons at 1e-4
    assume cuBLAS's exact products."""
    precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32

import os

import pytest
import torch

# Triton kernels run under the CPU interpreter when there is no GPU; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from reference_impls.models import tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """A 2-layer random-weight Llama with GQA (4 query heads, 2 KV heads), shared by the fast tests."""
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct in bf16 (model, tokenizer); only for tests marked slow."""
    from reference_impls.models import load_model

    return load_model(dtype="bfloat16")  # the benchmark's dtype: ratios count against a 16-bit cache

import os

import torch

# Triton kernels run under the CPU interpreter when there is no GPU; this must be set before triton is imported
# (the root conftest does the same; repeated here so this folder's tests never import triton un-interpreted).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

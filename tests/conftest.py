"""Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter; the
variable must be set before triton is first imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

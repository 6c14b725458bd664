import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run in Triton's interpreter (numpy on the CPU);
# it must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:  # triton decorates its own library functions (tl.randn) when first imported
        import triton  # noqa: F401
    except ImportError:
        pass

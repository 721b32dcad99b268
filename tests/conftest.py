import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

# Triton picks interpreter or compiler once per process, when it is first imported, and
# importing transformers' model code imports it (through torch._dynamo). So the kernel
# tests' interpreter set-up must run before any test module is collected: here.
if not torch.cuda.is_available():
    from tests_kernels_setup import import_interpreted  # noqa: E402

    import_interpreted()

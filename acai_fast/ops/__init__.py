"""Fused ops of the ACAI step. Each module holds the PyTorch reference `<op>_ref`, the Triton kernels
(and, where built, the CUDA extension binding) and the functional `<op>` that dispatches between them."""

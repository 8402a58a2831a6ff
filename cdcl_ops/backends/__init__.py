"""The backends of the masked InfoNCE op, of the supervised contrastive loss and of the patch
foreground counts.

    platform.py        what this process and the kernels can do (Triton installed / interpreting,
                       the fused kernels' dtypes and MAX_D); imports nothing of cdcl_ops
    interface.py       the bundles the kernels take (Masks, InverseNorms, Options; Contrast) and the
                       entry points' Protocols (Forward, BankGrad, PatchCounts: csrc/cuda/launch.h
                       in Python; ContrastForward, ContrastBankGrad)
    registry.py        the table of backends and its record type, `Backend` (the losses each
                       takes); imports no backend
    reference.py       the materialising oracle (autograd over the N x M matrix), both losses
    chunked.py         pure PyTorch streaming over bank chunks, any device
    triton_backend.py  the triton record; its kernels: triton_forward.py, triton_backward.py,
                       triton_contrast.py (the supervised contrastive loss), triton_patches.py,
                       tl_utils.py (loaded on first use)
    native.py          the C++ / CUDA kernels of csrc/ (cdcl_ops._C): the cpu and cuda records
    builtin.py         registers each module's RECORDS

The registry imports only interface and platform; the backend modules import the registry (for
the record type), never the other way round; the kernel modules (triton_*, tl_utils) import
neither the registry nor a record module. Nothing here imports the package's upper layers
(infonce, ops, supcon, supcon_ops, cross_patch): docs/design.md §4 has the layers.
"""

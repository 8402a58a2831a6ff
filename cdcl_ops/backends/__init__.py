"""Backends of the masked InfoNCE op.

`reference` is plain autograd over the materialised N x M matrix (the test oracle). The streaming
backends (`chunked`, `triton`, and the native `cpu`/`cuda` ones) share one interface, used by the
custom ops in `cdcl_ops.ops`:

    forward(q, p, k, q_lab, q_grp, k_lab, k_grp, table, inv_tau, need_o, chunk_size, precision)
        -> loss (N,), lse (N,), o (N, D) or (0, D)      (accumulation dtype: fp32, fp64 for fp64)
    bank_grad(q, k, q_lab, q_grp, k_lab, k_grp, table, lse, gs, inv_tau, chunk_size, precision)
        -> dk (M, D) in k's dtype, where gs = upstream gradient / tau

q, p, k are already L2-normalised and contiguous; masks are in `_validate.canonical_masks` form.
"""

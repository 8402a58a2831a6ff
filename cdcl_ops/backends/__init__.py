"""Backends of the masked InfoNCE op, each one record of `registry` (where it runs, its dtypes and
maximum D, its entry points).

`reference` is plain autograd over the materialised N x M matrix (the test oracle). The streaming
backends (`chunked`, `triton`, and the native `cpu`/`cuda` ones) share one interface, used by the
custom ops in `cdcl_ops.ops`:

    forward(q, p, k, inv_q, inv_p, inv_k, masks, inv_tau, need_o, chunk_size, precision)
        -> loss (N,), lse (N,), o (N, D) or (0, D)      (accumulation dtype: fp32, fp64 for fp64)
    bank_grad(q, k, inv_q, inv_k, masks, lse, gs, inv_tau, chunk_size, precision)
        -> (M, D) gradient with respect to the unit bank rows, where gs = upstream gradient / tau

q, p, k are the raw contiguous rows and inv_* their inverse L2 norms (cdcl_ops.normalize): every
similarity is computed between the unit rows x * inv, and O_i is a weighted sum of unit bank rows.
`masks` is a `_validate.Masks` (q_lab, q_grp, k_lab, k_grp, table) from `canonical_masks`.
"""

"""Backends of the masked InfoNCE op, each one record of `registry` (where it runs, its dtypes and
maximum D, its entry points).

`reference` is plain autograd over the materialised N x M matrix (the test oracle). The streaming
backends (`chunked`, `triton`, and the native `cpu`/`cuda` ones) share one interface, used by the
custom ops in `cdcl_ops.ops`:

    forward(q, p, k, inv, masks, options, need_o)
        -> loss (N,), lse (N,), o (N, D) or (0, D)      (accumulation dtype: fp32, fp64 for fp64)
    bank_grad(q, k, inv, masks, lse, gs, options)
        -> (M, D) gradient with respect to the unit bank rows, where gs = upstream gradient / tau

q, p, k are the raw contiguous rows and `inv` a `normalize.InverseNorms` of their inverse L2 norms
(inv.p is None in bank_grad): every similarity is computed between the unit rows x * inv, and O_i
is a weighted sum of unit bank rows. `masks` is a `_validate.Masks` (q_lab, q_grp, k_lab, k_grp,
table) from `canonical_masks`; `options` a `registry.Options` (inv_tau, and chunk_size / precision
for the backends that read them, at their defaults for the others).
"""

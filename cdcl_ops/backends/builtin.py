"""Registers the built-in backends, each module's `RECORDS`, in the order `registry.names()` lists
them (imported by `cdcl_ops/__init__.py`, so every `import cdcl_ops` has them)."""
from . import chunked, native, reference, registry, triton_backend

for _module in (reference, chunked, triton_backend, native):
    for _record in _module.RECORDS:
        registry.register(_record)

"""Build script. The C++/CUDA extension in csrc/ is added by the csrc work (issue: C++ and CUDA
kernels); until csrc/ holds sources, this installs the pure-Python package."""
from setuptools import find_packages, setup

setup(
    name="cdcl_ops",
    version="0.1.0",
    description="Fused, memory-bounded pseudo-label-masked InfoNCE for cross-patch dense "
                "contrastive learning (CDCL)",
    packages=find_packages(include=["cdcl_ops", "cdcl_ops.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"]},
)

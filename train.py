"""Train a nuclei segmenter (mean teacher + the CDCL loss) from a checkout; the same program as the
installed `cdcl-train` (cdcl_nuclei/cli_train.py; `python train.py --help`, docs/training.md).

    python train.py --data data/dsb2018_sample --preset small --method cdcl --out runs/demo
    torchrun --nproc_per_node 2 train.py ...            # DDP (gloo on CPU, nccl on CUDA)
"""
import sys

from cdcl_nuclei.cli_train import main

if __name__ == "__main__":
    sys.exit(main())

"""Compile the Triton kernels for sm_80 and sm_90 without a GPU (run by test_triton_compile.py in
a process without TRITON_INTERPRET, since the interpreter replaces the kernels)."""
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from cdcl_ops.backends import triton_backward, triton_contrast, triton_forward

PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
INTS = {"N": "i32", "M": "i32", "D": "i32", "G": "i32"}
MASKS = {"Q_LAB": "*i32", "Q_CODE": "*i32", "K_LAB": "*i32", "K_GRP": "*i32", "TABLE": "*u8"}
CASES = [(torch.bfloat16, 128, True, "ieee"), (torch.float32, 128, True, "tf32x3"),
         (torch.float32, 128, True, "tf32"), (torch.float16, 200, False, "ieee"),
         (torch.bfloat16, 512, True, "ieee"), (torch.float32, 3, True, "ieee"),
         (torch.float32, 128, True, "ieee"), (torch.float32, 200, True, "tf32x3"),
         (torch.float32, 512, False, "tf32x3")]
# the supervised contrastive kernels, sm_90 only (each compile costs seconds): (dtype, D, use_bits,
# precision, "all" or not, the in-batch form or not, paired positives or not)
CONTRAST_CASES = [(torch.bfloat16, 128, True, "ieee", True, False, True),
                  (torch.float32, 128, True, "tf32x3", False, True, False),
                  (torch.float16, 256, False, "ieee", False, False, True),
                  (torch.float32, 512, True, "tf32", True, True, False)]


def _compile(fn, signature, constexprs, arch, cfg):
    sig = dict(signature, **INTS, **{k: "constexpr" for k in constexprs})
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    limit = 227 * 1024 if arch >= 90 else 163 * 1024
    if kernel.metadata.shared > limit:
        raise RuntimeError(f"{fn.__name__}: {kernel.metadata.shared} bytes of shared memory > {limit}")
    return kernel.metadata.shared


def main():
    for arch in (80, 90):
        for dtype, d, use_bits, prec in CASES:
            bd = max(16, triton.next_power_of_2(d))
            t = PTR[dtype]
            cfg = triton_forward.forward_config(bd, dtype, prec)
            fwd = _compile(triton_forward._forward_kernel,
                           dict(Q=t, P=t, K=t, **MASKS, LOSS="*fp32", LSE="*fp32", O="*fp32"),
                           dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=bd,
                                USE_BITS=use_bits, NEED_O=True, PRECISION=prec, UPCAST=False), arch, cfg)
            cfg = triton_backward.bank_grad_config(bd, dtype, prec)
            bwd = _compile(triton_backward._bank_grad_kernel,
                           dict(Q=t, K=t, **MASKS, LSE="*fp32", GS="*fp32", DK=t, tau="fp32"),
                           dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=bd,
                                USE_BITS=use_bits, PRECISION=prec, UPCAST=False), arch, cfg)
            print(f"sm_{arch} {dtype} {prec} D={d}: shared memory fwd {fwd} B, bank_grad {bwd} B")
    for dtype, d, use_bits, prec, all_, self_bank, has_p in CONTRAST_CASES:
        bd = max(16, triton.next_power_of_2(d))
        t = PTR[dtype]
        flags = dict(USE_BITS=use_bits, ALL=all_, EXCLUDE_SELF=self_bank, PRECISION=prec, UPCAST=False)
        cfg = triton_contrast.contrast_forward_config(bd, dtype, prec)
        fwd = _compile(triton_contrast._contrast_forward_kernel,
                       dict(Q=t, P=t, K=t, **MASKS, Q_GRP="*i32", LOSS="*fp32", LSE="*fp32",
                            N_POS="*i32", LSE_W="*fp32", POS_COEF="*fp32", U="*fp32"),
                       dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=bd, HAS_P=has_p,
                            NEED_U=True, **flags), 90, cfg)
        cfg = triton_backward.bank_grad_config(bd, dtype, prec)
        bwd = _compile(triton_contrast._contrast_bank_grad_kernel,
                       dict(Q=t, K=t, **MASKS, LSE="*fp32", GS_LSE="*fp32", GS_POS="*fp32", DK="*fp32",
                            tau="fp32"),
                       dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=bd, **flags), 90, cfg)
        print(f"contrast sm_90 {dtype} {prec} D={d} all={all_}: shared memory fwd {fwd} B, "
              f"bank_grad {bwd} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())

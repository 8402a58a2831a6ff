"""Build and call the CUDA kernels of csrc/cuda on the CPU, through the emulator of
tests/native/cuda_emu.

The .cu files are rewritten where C++ cannot parse them (kernel launches and `extern __shared__`
arrays; nothing else changes), compiled with the host C++ compiler against the emulator's shim
headers into a small shared library (cached under build/cuda_emu/ by the hash of its sources),
and called through ctypes with CPU tensors. `Emulator` has the signatures of the
`torch.ops.cdcl_ops_C` CUDA ops, plus the backend interface of `cdcl_ops.backends` (`forward`,
`bank_grad`), so the op's autograd can run on it. What the emulation does and does not check is
written at the top of tests/native/cuda_emu/emu.h.
"""
import ctypes
import glob
import hashlib
import os
import re
import shutil
import subprocess

import torch

from cdcl_ops.backends import native
from paths import ROOT

EMU_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu")
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
KERNEL_SOURCES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
SELFTEST_SOURCE = os.path.join(EMU_DIR, "selftest.cu")
CXX_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wno-unused-function",
             "-Wno-unknown-pragmas", "-Wno-sign-compare"]
# CDCL_EMU_ASAN=1: build with AddressSanitizer and hand the kernels exact-size buffers, so that any
# read or write past an end is reported (run python with LD_PRELOAD=$(c++ -print-file-name=libasan.so)
# and ASAN_OPTIONS=detect_leaks=0). Without it, guard bands catch what changes the results.
ASAN = os.environ.get("CDCL_EMU_ASAN") == "1"
if ASAN:
    CXX_FLAGS += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # launch.h: Dtype
PIXEL_TYPES = {torch.int64: 0, torch.int32: 1, torch.int16: 2, torch.int8: 3, torch.uint8: 4,
               torch.bool: 5, torch.float32: 6, torch.float64: 7, torch.float16: 8,
               torch.bfloat16: 9}  # launch.h: PixelType
GUARD = 0 if ASAN else 64  # elements of poison around every buffer handed to the kernels

_LAUNCH = re.compile(r"([\w:]+(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s*)?([\w: ]+?)\s+(\w+)\[\];")


def translate(source: str) -> str:
    """The two rewrites that make a .cu file plain C++ for the emulator."""
    out = _LAUNCH.sub(lambda mt: f"::cdcl_emu::launch({mt.group(1)}, {mt.group(2)})(", source)
    out = _EXTERN_SHARED.sub(lambda mt: f"{mt.group(1)}* {mt.group(2)} = "
                             f"::cdcl_emu::dynamic_shared_as<{mt.group(1)}>();", out)
    if "<<<" in out or "extern __shared__" in out:
        raise RuntimeError("cuda_emulator.translate: a launch or shared array it cannot rewrite")
    return out


def compiler():
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    return cxx


def build() -> str:
    """Compile the library (once per content of its sources) and return its path."""
    headers = sorted(glob.glob(os.path.join(CUDA_DIR, "*.h")) + glob.glob(os.path.join(CUDA_DIR, "*.cuh")))
    emu_files = sorted(glob.glob(os.path.join(EMU_DIR, "**", "*.*"), recursive=True))
    digest = hashlib.sha256(" ".join(CXX_FLAGS).encode())
    for path in KERNEL_SOURCES + headers + emu_files + [os.path.abspath(__file__)]:
        digest.update(path.encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    out_dir = os.path.join(ROOT, "build", "cuda_emu", "asan" if ASAN else "plain", digest.hexdigest()[:16])
    lib = os.path.join(out_dir, "libcdcl_cuda_emu.so")
    if os.path.exists(lib):
        return lib
    parent = os.path.dirname(out_dir)
    if os.path.isdir(parent):  # builds of older sources of the same kind
        for old in os.listdir(parent):
            shutil.rmtree(os.path.join(parent, old), ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    sources = []
    for path in KERNEL_SOURCES + [SELFTEST_SOURCE]:
        with open(path) as f:
            text = translate(f.read())
        dst = os.path.join(out_dir, os.path.basename(path) + ".cpp")
        with open(dst, "w") as f:
            f.write(f'#line 1 "{path}"\n' + text)
        sources.append(dst)
    sources += [os.path.join(EMU_DIR, "runtime.cpp"), os.path.join(EMU_DIR, "entry.cpp")]
    tmp = lib + f".tmp{os.getpid()}"
    cmd = [compiler(), *CXX_FLAGS, f"-I{os.path.join(EMU_DIR, 'include')}", f"-I{EMU_DIR}",
           f"-I{CUDA_DIR}", *sources, "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("building the CUDA emulator failed:\n" + " ".join(cmd) + "\n" + proc.stderr)
    os.replace(tmp, lib)
    return lib


class EmulatorError(RuntimeError):
    pass


def _guarded(t: torch.Tensor, poison):
    """A contiguous copy of t inside a buffer with GUARD poisoned elements on each side."""
    buf = torch.full((t.numel() + 2 * GUARD,), poison, dtype=t.dtype)
    view = buf[GUARD:GUARD + t.numel()].view(t.shape)
    view.copy_(t)
    return buf, view


class Emulator:
    def __init__(self, schedule_seed=0):
        self.lib = ctypes.CDLL(build())
        self.lib.cdcl_emu_message.restype = ctypes.c_char_p
        self.lib.cdcl_emu_fiber_switches.restype = ctypes.c_ulonglong
        self.schedule_seed = schedule_seed
        self._keep = []

    # -- plumbing ------------------------------------------------------------------------------
    def _in(self, t):
        """Pointer to a guarded copy of an input (floats poisoned with NaN, so reading past the
        end shows in the results)."""
        if t is None:
            return None
        poison = float("nan") if t.dtype.is_floating_point else (True if t.dtype == torch.bool else -7)
        buf, view = _guarded(t.detach().cpu(), poison)
        self._keep.append(buf)
        return ctypes.c_void_p(view.data_ptr())

    @staticmethod
    def _sentinel(dtype):
        return 1234.5 if dtype.is_floating_point else -99

    def _out(self, shape, dtype):
        """An output buffer, sentinel-filled (an element the kernel leaves unwritten shows)."""
        fill = self._sentinel(dtype)
        return _guarded(torch.full(shape, fill, dtype=dtype), fill)

    def _check_guards(self, *bufs):
        for buf in bufs if GUARD else ():
            fill = self._sentinel(buf.dtype)
            if not (torch.all(buf[:GUARD] == fill) and torch.all(buf[-GUARD:] == fill)):
                raise EmulatorError("a kernel wrote outside its output buffer")

    def _call(self, fn, *args):
        self.lib.cdcl_emu_set_schedule(ctypes.c_uint(self.schedule_seed))
        self.lib.cdcl_emu_clear_message()
        err = fn(*args)
        self._keep.clear()
        if err != 0:
            raise EmulatorError(f"cudaError {err}: {self.lib.cdcl_emu_message().decode()}")

    @property
    def fiber_switches(self):
        return self.lib.cdcl_emu_fiber_switches()

    # -- the ops, as torch.ops.cdcl_ops_C --------------------------------------------------------
    def infonce_fwd(self, q, p, k, inv_q, inv_p, inv_k, q_lab, q_grp, k_lab, k_grp, table, inv_tau,
                    need_o, tensor_cores):
        n, d = q.shape
        m = k.shape[0]
        loss_buf, loss = self._out((n,), torch.float32)
        lse_buf, lse = self._out((n,), torch.float32)
        o_buf, o = self._out((n if need_o else 0, d), torch.float32)
        f = self.lib.cdcl_emu_infonce_fwd
        f.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 11 + [ctypes.c_int64] * 4 + \
            [ctypes.c_float, ctypes.c_int] + [ctypes.c_void_p] * 3
        self._call(f, DTYPES[q.dtype], self._in(q), self._in(p), self._in(k), self._in(inv_q),
                   self._in(inv_p), self._in(inv_k), self._in(q_lab), self._in(q_grp), self._in(k_lab),
                   self._in(k_grp), self._in(table), table.shape[0], n, m, d, float(inv_tau),
                   int(tensor_cores), loss.data_ptr(), lse.data_ptr(), o.data_ptr() if need_o else None)
        self._check_guards(loss_buf, lse_buf, o_buf)
        return loss.clone(), lse.clone(), o.clone()

    def infonce_bank_grad(self, q, k, inv_q, inv_k, q_lab, q_grp, k_lab, k_grp, table, lse, gs,
                          inv_tau, tensor_cores):
        n, d = q.shape
        m = k.shape[0]
        dk_buf, dk = self._out((m, d), torch.float32)
        f = self.lib.cdcl_emu_infonce_bank_grad
        f.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 9 + [ctypes.c_int64] + \
            [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_float, ctypes.c_int, ctypes.c_void_p]
        self._call(f, DTYPES[q.dtype], self._in(q), self._in(k), self._in(inv_q), self._in(inv_k),
                   self._in(q_lab), self._in(q_grp), self._in(k_lab), self._in(k_grp), self._in(table),
                   table.shape[0], self._in(lse), self._in(gs), n, m, d, float(inv_tau),
                   int(tensor_cores), dk.data_ptr())
        self._check_guards(dk_buf)
        return dk.clone()

    def patch_fg_counts(self, x, grid, fg_class):
        logits = x.dtype.is_floating_point
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        c = x.shape[1] if logits else 1
        counts_buf, counts = self._out((b, grid, grid), torch.int32)
        f = self.lib.cdcl_emu_patch_fg_counts
        f.argtypes = [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 6 + [ctypes.c_void_p]
        self._call(f, PIXEL_TYPES[x.dtype], self._in(x), b, c, h, w, grid, fg_class, counts.data_ptr())
        self._check_guards(counts_buf)
        return counts.clone()

    # -- the entry points of cdcl_ops.backends.interface, as cdcl_ops.backends.native -----------
    def forward(self, q, p, k, inv, masks, options, need_o):
        return self.infonce_fwd(q, p, k, *inv, *masks, options.inv_tau, need_o,
                                native.wants_tensor_cores(q.dtype, options.precision))

    def bank_grad(self, q, k, inv, masks, lse, gs, options):
        return self.infonce_bank_grad(q, k, inv.q, inv.k, *masks, lse.float().contiguous(),
                                      gs.float().contiguous(), options.inv_tau,
                                      native.wants_tensor_cores(q.dtype, options.precision))

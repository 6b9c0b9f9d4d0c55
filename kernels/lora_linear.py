"""Triton kernels of the fused LoRA linear op: y = x W^T + bias + s (x A^T) B^T, its gradients, and the multi-adapter form.

One forward kernel serves the forward pass and the input gradient: it computes
    out = X Wp^T + H Bp^T + bias
where the LoRA term H Bp^T enters the base GEMM's fp32 accumulator. H (rows x r, fp32) is either
precomputed (`H = s X A^T`) or accumulated in the same program from X and A during the K loop
(FUSE_XA); which wins depends on the rank and the device, so the choice is data (configs/).
For dx = dy W + s (dy B) A the same kernel runs on dy with Wp = W^T, A' = B^T, Bp = A^T.
The adapter gradients dA = s (dy B)^T x and dB = s dy^T (x A^T) are thin reductions over the
rows: `_tn_kernel` accumulates them in fp32, split over rows with atomics on large inputs.
Every launcher takes arbitrary 2-D strides; the PyTorch reference is hello_fast.ops.lora_linear.
"""
from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl

_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "lora_linear.json")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _table() -> dict:
    with open(_CONFIG_FILE) as f:
        return json.load(f)


def _device_facts(device: torch.device) -> tuple[str, int]:
    """(name, streaming multiprocessors) of the CUDA device a launch runs on.

    The name picks the config table, the SM count splits the row reductions. The ahead-of-time
    report (benchmarks/_triton_aot.py) stands in for this function to compile without a GPU.
    """
    props = torch.cuda.get_device_properties(device)
    return props.name, props.multi_processor_count


def _tf32_allowed() -> bool:
    """torch's rule for fp32 matmuls on CUDA: TF32 only where the user allowed it (torch's default is IEEE)."""
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", "none")  # torch >= 2.9; "none" defers to the legacy flag
    if setting != "none":
        return setting == "tf32"
    return bool(matmul.allow_tf32)  # torch.set_float32_matmul_precision("high"/"medium") sets it too


def precision_for(*dtypes: torch.dtype) -> str:
    """The tl.dot input precision for a product whose operands come from tensors of `dtypes`.

    16-bit inputs already carry less precision than TF32 (10-bit mantissa), so the fp32 LoRA
    products beside them run on TF32 tensor cores; all-fp32 inputs follow torch's fp32 matmul
    setting (`torch.backends.cuda.matmul.allow_tf32` / `torch.set_float32_matmul_precision`).
    The interpreter computes exactly ("ieee"). Any other dtype (float64) has no kernel here: the
    ops refuse it before dispatching, and this refuses it again so no launcher compiles one.
    """
    unserved = [d for d in dtypes if d not in (torch.float32, torch.float16, torch.bfloat16)]
    if unserved:
        raise ValueError(f"lora_linear: the Triton kernels take float32, float16 or bfloat16 operands, got {unserved[0]}")
    if _interpreting():
        return "ieee"
    if any(d in (torch.float16, torch.bfloat16) for d in dtypes):
        return "tf32"
    return "tf32" if _tf32_allowed() else "ieee"


def _matches(rule: dict, rows: int, n: int, r: int, dtype: torch.dtype, precision: str, aligned: bool) -> bool:
    dtypes = rule.get("dtypes")
    return (rows >= rule.get("min_rows", 0) and n >= rule.get("min_n", 0) and r <= rule.get("max_rank", 1 << 30)
            and (dtypes is None or str(dtype).removeprefix("torch.") in dtypes)
            and rule.get("precision", precision) == precision and rule.get("aligned", aligned) == aligned)


def _aligned(*tensors: torch.Tensor) -> bool:
    """Whether Triton can vectorise the loads of these GEMM operands: 16-byte aligned base pointers and every
    non-unit stride a multiple of 16 elements (what Triton's launch specialisation proves). Unaligned
    operands are loaded element by element, which costs registers: they get smaller tiles."""
    return all(t.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in t.stride() if st != 1) for t in tensors)


def config_for(device: torch.device, rows: int, n: int, k: int, r: int,
               dtype: torch.dtype = torch.float32, precision: str = "ieee", aligned: bool = True) -> dict:
    """The launch configuration of the GEMM kernels for one problem, from configs/lora_linear.json.

    Entries are matched by device name (e.g. "NVIDIA H200"), else "default"; within a device the
    first rule whose bounds (min_rows, min_n, max_rank), `dtypes`, `precision` and `aligned` hold
    wins. The interpreter has its own entry (large blocks: its speed is set by the number of programs).
    """
    table = _table()
    if _interpreting():
        rules = table["interpreter"]
    else:
        rules = table.get(_device_facts(device)[0], table["default"])
    for rule in rules:
        if _matches(rule, rows, n, r, dtype, precision, aligned):
            return rule
    raise LookupError(f"lora_linear: no rule in configs/lora_linear.json serves {dtype} with {precision} precision")


def reduction_config(precision: str) -> dict:
    """The tile of the row reductions (`tn`) for one input precision (the first rule that serves it)."""
    if _interpreting():
        return _table()["interpreter_reduction"]
    return next(rule for rule in _table()["reduction"] if rule.get("precision", precision) == precision)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


@triton.jit
def _fused_kernel(
    X, W, H, A, Bp, BIAS, OUT,
    M, N, K, R,
    s_xm, s_xk, s_wn, s_wk, s_hm, s_hr, s_ar, s_ak, s_bn, s_br, s_om, s_on,
    scale,
    HAS_BIAS: tl.constexpr, FUSE_XA: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped program order: neighbouring programs share rows of X in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    n_ok = rn < N
    r_ok = rr < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(X + rm[:, None] * s_xm + kk[None, :] * s_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + rn[None, :] * s_wn + kk[:, None] * s_wk, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if FUSE_XA:
            a = tl.load(A + rr[None, :] * s_ar + kk[:, None] * s_ak, mask=r_ok[None, :] & k_ok[:, None], other=0.0)
            xa = tl.dot(x.to(tl.float32), a.to(tl.float32), xa, input_precision=PRECISION)
    if FUSE_XA:
        b = tl.load(Bp + rn[None, :] * s_bn + rr[:, None] * s_br, mask=n_ok[None, :] & r_ok[:, None], other=0.0)
        acc = tl.dot(xa * scale, b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        # the precomputed fp32 H, BLOCK_R columns at a time: registers stay bounded at any rank
        for r0 in range(0, R, BLOCK_R):
            rc = r0 + rr
            rc_ok = rc < R
            h = tl.load(H + rm[:, None] * s_hm + rc[None, :] * s_hr, mask=m_ok[:, None] & rc_ok[None, :], other=0.0)
            b = tl.load(Bp + rn[None, :] * s_bn + rc[:, None] * s_br, mask=n_ok[None, :] & rc_ok[:, None], other=0.0)
            acc = tl.dot(h, b.to(tl.float32), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _tn_kernel(
    L, Rt, OUT, M, P, Q, split_m,
    s_lm, s_lp, s_rm, s_rq, s_op, s_oq,
    scale,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """OUT[p, q] (+)= scale * sum_m L[m, p] R[m, q], accumulated in fp32; rows split over split_m programs.

    UPCAST: the operands differ in dtype or one is fp32, so both are multiplied as fp32 (TF32 or
    IEEE by PRECISION); two 16-bit operands of one dtype multiply natively (exact products)."""
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rmb = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(pid_s * BLOCK_M, M, BLOCK_M * split_m):
        rm = m0 + rmb
        m_ok = rm < M
        lt = tl.load(L + rp[:, None] * s_lp + rm[None, :] * s_lm, mask=(rp[:, None] < P) & m_ok[None, :], other=0.0)
        r = tl.load(Rt + rm[:, None] * s_rm + rq[None, :] * s_rq, mask=m_ok[:, None] & (rq[None, :] < Q), other=0.0)
        if UPCAST:
            acc = tl.dot(lt.to(tl.float32), r.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(lt, r, acc)
    acc = acc * scale
    ptrs = OUT + rp[:, None] * s_op + rq[None, :] * s_oq
    mask = (rp[:, None] < P) & (rq[None, :] < Q)
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def _multi_kernel(
    X, W, H, IDX, Bs, BIAS, OUT,
    M, N, K, R, NA,
    s_xm, s_xk, s_wn, s_wk, s_hm, s_hr, s_ba, s_bn, s_br, s_om, s_on,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out = X W^T + bias + (per row m) H[m] B[idx[m]]^T: one base GEMM, one masked LoRA dot per adapter."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(X + rm[:, None] * s_xm + kk[None, :] * s_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + rn[None, :] * s_wn + kk[:, None] * s_wk, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    idx = tl.load(IDX + rm, mask=m_ok, other=-1)
    # per adapter, BLOCK_R columns of H at a time with the other adapters' rows masked out at the load
    # (not in registers: a register operand beside the accumulator spilled at 128 x 256 tiles on sm_90)
    for j in range(NA):
        hj_rows = m_ok & (idx == j)
        for r0 in range(0, R, BLOCK_R):
            rc = r0 + rr
            rc_ok = rc < R
            hj = tl.load(H + rm[:, None] * s_hm + rc[None, :] * s_hr, mask=hj_rows[:, None] & rc_ok[None, :], other=0.0)
            b = tl.load(Bs + j * s_ba + rn[None, :] * s_bn + rc[:, None] * s_br, mask=n_ok[None, :] & rc_ok[:, None], other=0.0)
            acc = tl.dot(hj, b.to(tl.float32), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fused(x2d, wp, bp, scale, *, h=None, a=None, bias=None, out=None, fuse_xa=None):
    """out (rows x N) = x2d Wp^T + H Bp^T + bias, with H = given h, or s x2d A^T computed in-program.

    x2d (M, K), wp (N, K), bp (N, r), a (r, K), h (M, r) fp32 pre-scaled, bias (N,). Any strides.
    """
    M, K = x2d.shape
    N = wp.shape[0]
    R = bp.shape[1]
    precision = precision_for(x2d.dtype)
    cfg = config_for(x2d.device, M, N, K, R, x2d.dtype, precision, _aligned(x2d, wp))
    if fuse_xa is None:
        fuse_xa = h is None and R <= cfg["fuse_xa_max_rank"]
    if not fuse_xa and h is None:
        h = tn(x2d.t(), a.t(), scale)  # s x A^T (rows x r) in fp32, no fp32 copy of x
    if out is None:
        out = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    BM, BN, BK = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    dummy = bp  # unused pointer arguments still need a tensor
    hh = h if h is not None else dummy
    aa = a if a is not None else dummy
    _fused_kernel[grid](
        x2d, wp, hh, aa, bp, bias if bias is not None else dummy, out,
        M, N, K, R,
        x2d.stride(0), x2d.stride(1), wp.stride(0), wp.stride(1),
        hh.stride(0), hh.stride(1), aa.stride(0), aa.stride(1), bp.stride(0), bp.stride(1),
        out.stride(0), out.stride(1),
        float(scale),
        HAS_BIAS=bias is not None, FUSE_XA=bool(fuse_xa), PRECISION=precision,
        # the precomputed H, block_r columns at a time, at least min_block_r (masked below the rank): 16 columns of a
        # 16-bit dx (W transposed) spilled at the 64 x 128 tile on sm_80, 32 of an fp32 one (benchmarks/gpu_static.py)
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        BLOCK_R=_block_r(R) if fuse_xa else min(max(_block_r(R), cfg.get("min_block_r", 16)), cfg["block_r"]),
        GROUP_M=cfg.get("group_m", 8),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
    )
    return out


def tn(left, right, scale: float = 1.0):
    """scale * left^T right in fp32: left (M, P), right (M, Q) -> (P, Q); reduction over the rows.

    The product's precision comes from the inputs (precision_for): fp32 operands follow torch's
    fp32 matmul setting, a 16-bit operand makes it TF32, two 16-bit operands of one dtype
    multiply natively.
    """
    M, P = left.shape
    Q = right.shape[1]
    precision = precision_for(left.dtype, right.dtype)
    upcast = left.dtype != right.dtype or left.dtype == torch.float32 or _interpreting()
    cfg = reduction_config(precision)
    BP = max(16, min(cfg["block_p"], triton.next_power_of_2(P)))
    BQ = max(16, min(cfg["block_q"], triton.next_power_of_2(Q)))
    BM = cfg["block_m"]
    tiles = triton.cdiv(P, BP) * triton.cdiv(Q, BQ)
    split = 1
    if not _interpreting():
        # enough programs to fill the device, but at least a few row blocks each
        sms = _device_facts(left.device)[1]
        split = max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(M, 4 * BM)))
    out = (torch.zeros if split > 1 else torch.empty)((P, Q), device=left.device, dtype=torch.float32)
    grid = (triton.cdiv(P, BP), triton.cdiv(Q, BQ), split)
    _tn_kernel[grid](
        left, right, out, M, P, Q, split,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1), out.stride(0), out.stride(1),
        float(scale),
        PRECISION=precision, UPCAST=upcast, ATOMIC=split > 1,
        BLOCK_P=BP, BLOCK_Q=BQ, BLOCK_M=BM,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    return out


def multi(x2d, w, h, index, b_stack, bias=None):
    """out = x2d W^T + bias + H[m] B[index[m]]^T, H (M, r) fp32 pre-scaled per row, b_stack (n, N, r)."""
    M, K = x2d.shape
    N = w.shape[0]
    NA, _, R = b_stack.shape
    precision = precision_for(x2d.dtype)
    cfg = config_for(x2d.device, M, N, K, R, x2d.dtype, precision, _aligned(x2d, w))
    out = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    BM, BN, BK = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _multi_kernel[grid](
        x2d, w, h, index, b_stack, bias if bias is not None else w, out,
        M, N, K, R, NA,
        x2d.stride(0), x2d.stride(1), w.stride(0), w.stride(1), h.stride(0), h.stride(1),
        b_stack.stride(0), b_stack.stride(1), b_stack.stride(2), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, PRECISION=precision,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=cfg["block_r"],  # 16 columns spilled at rank <= 16 (sm_80, sm_90)
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
    )
    return out

"""Compile the package's Triton kernels ahead of time for GPUs that are not here, and read their resources from the cubins.

How: Triton's active driver is replaced by a stand-in whose `get_current_target()` names the
architecture to compile for (`GPUTarget("cuda", arch, 32)`); the package's own launchers
(hello_fast.kernels.*) then run unchanged on CPU tensors, and every `JITFunction.run` they reach
is forced to `warmup=True`: Triton's real binder (alignment, `== 1` and `% 16` specialisation)
and compiler run down to a cubin, and nothing launches. The launchers ask one private function
(`_device_facts`) for the device's name and SM count; it is stood in for too. From each cubin,
the ptxas/cuobjdump that ship inside the triton wheel read registers, spills (STL/LDL in the
SASS), vector loads; the PTX gives the tensor-core instructions (mma.sync / wgmma / tcgen05.mma).

This drives private Triton APIs (triton.runtime.driver, JITFunction.run's `warmup`, the
compiled kernel's `asm`/`metadata`); `api_missing()` says why when the installed Triton lacks
them, and callers skip. Compilation needs `TRITON_INTERPRET` off before triton is imported, so
the work runs in worker processes (`compile_scenarios`), never in the caller's process.

A *scenario* is one call of an op as the package makes it (e.g. lora_linear's backward for
bf16 under the H200's second rule); each Triton launch in it becomes one report row.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile

import torch

# opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), the limit Triton checks at launch
SMEM_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448, 120: 101_376}
# (name, SMs) a device-agnostic ("default") config table is compiled as, per architecture; the
# name is deliberately not a table key. SM counts: A100 SXM 108, RTX 3090 82, RTX 4090 128,
# H100 SXM 132, B200 148, RTX 5090 170.
_DEFAULT_DEVICE = {80: 108, 86: 82, 89: 128, 90: 132, 100: 148, 120: 170}
_NAMED_SMS = {"NVIDIA H200": 132, "NVIDIA H100 80GB HBM3": 132, "NVIDIA A100-SXM4-80GB": 108}

# Roofline assumptions: dense peaks of the SXM parts (NVIDIA datasheets), no sparsity.
PEAKS = {
    "H100": {"bytes_per_s": 3.35e12, "bf16_flops": 989e12, "fp16_flops": 989e12, "tf32_flops": 494e12, "fp32_flops": 67e12},
    "H200": {"bytes_per_s": 4.8e12, "bf16_flops": 989e12, "fp16_flops": 989e12, "tf32_flops": 494e12, "fp32_flops": 67e12},
}

# Problem sizes of the scenarios (the roofline's compulsory bytes and FLOPs are counted at these).
LORA_K, LORA_N = 1024, 1000          # the projector head: RN50 CLIP embedding -> ImageNet-1k classes
LORA_K_UNALIGNED = 1000              # x's row stride not a multiple of 16 elements: Triton cannot vectorise its loads
LORA_ROWS = 1024                     # rows for rules without a min_rows bound
LORA_RANKS = (8, 128)                # 8: fused x A^T in-program; 128: the paper's head rank (precomputed)
MULTI_ADAPTERS = 3
AUG_BATCH, AUG_SRC, AUG_OUT, AUG_CROP = 256, 256, 224, 192  # batch, stored image side, output side, crop side
LOSS_BATCH = 256
LOSS_CLASSES = (10, 100, 1000, 21843)

_TOOLS = ("ptxas", "cuobjdump")
_WORKER_STATE: dict = {}


def _tool(name: str) -> str:
    import triton  # the binaries ship inside the triton wheel

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# The Triton releases the static proof ran on (benchmarks/results/gpu_static.json's toolchain); pyproject.toml's
# `gpu-static` extra pins the same. A new release joins after `gpu_static.py --strict` is clean on it.
PROVEN_TRITON = ("3.8.0",)


def installed_triton() -> str | None:
    """The installed Triton's version, or None where it is not installed."""
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def toolchain_problem() -> str | None:
    """None if the installed Triton is one the static proof ran on and has the API it drives, else why not."""
    version = installed_triton()
    if version not in PROVEN_TRITON:
        found = f"triton {version} is installed" if version else "triton is not installed"
        return (f"{found}, but the static proof ran on triton {', '.join(PROVEN_TRITON)} only (benchmarks/_triton_aot.py "
                "PROVEN_TRITON, pyproject.toml's gpu-static extra): install it (pip install -e '.[gpu-static]'), or run "
                "benchmarks/gpu_static.py --strict on this version and add it to both")
    return api_missing()


def api_missing() -> str | None:
    """None if the installed Triton has what the ahead-of-time compile needs, else why not."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction
    except ImportError as e:
        return f"triton's private compile API is not importable ({e})"
    if not hasattr(driver, "set_active") or not hasattr(driver, "_active"):
        return f"triton {triton.__version__}: triton.runtime.driver.driver has no set_active/_active"
    params = inspect.signature(JITFunction.run).parameters
    if "warmup" not in params or "grid" not in params:
        return f"triton {triton.__version__}: JITFunction.run takes no grid/warmup arguments"
    for tool in _TOOLS:
        if not os.access(_tool(tool), os.X_OK):
            return f"triton {triton.__version__}: {tool} is not shipped in triton/backends/nvidia/bin"
    return None


class _StandInDriver:
    """Answers what Triton's JIT asks a driver while binding and compiling; nothing can launch through it."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch  # per-architecture kernel caches inside each JITFunction

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_device_capability(self, device=None):
        return divmod(self.arch, 10)


def _kernel_functions(module) -> list:
    from triton.runtime.jit import JITFunction

    return [v for v in vars(module).values() if isinstance(v, JITFunction)]


class _Capture:
    """Within `with`: the stand-in driver is active and every launch of `modules`' kernels compiles only.

    Each launch is recorded as (qualified kernel name, bound arguments, compiled kernel or None,
    error or None); a compile error is recorded and the launcher carries on.
    """

    def __init__(self, arch: int, modules, device_name: str, sms: int, compile_if=None):
        """`compile_if(specialisation)`: whether to compile a launch (default: every one); the others are only
        recorded (their specialisation, arguments and options), which costs no compile."""
        self.arch, self.modules, self.device = arch, modules, (device_name, sms)
        self.compile_if = compile_if
        self.phase = None  # a caller's label of the launches that follow (e.g. "forward", "backward")
        self.launches: list[dict] = []
        self._saved: list = []

    def __enter__(self):
        from triton.runtime.driver import driver

        self._previous = getattr(driver, "_active", None)  # no real driver may exist here: never ask for one
        driver.set_active(_StandInDriver(self.arch))
        for mod in self.modules:
            if hasattr(mod, "_device_facts"):
                self._saved.append((mod, "_device_facts", mod._device_facts))
                mod._device_facts = lambda device, _facts=self.device: _facts
            if hasattr(mod, "config_for"):
                self._saved.append((mod, "config_for", mod.config_for))
                mod.config_for = self._recording(mod, mod.config_for)
            for fn in _kernel_functions(mod):
                fn.run = self._runner(mod, fn)  # the instance attribute shadows JITFunction.run
                self._saved.append((fn, "run", None))
        return self

    def __exit__(self, *exc):
        from triton.runtime.driver import driver

        for obj, attr, old in reversed(self._saved):
            if old is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)
        driver.set_active(self._previous)
        return False

    def _recording(self, mod, config_for):
        """config_for that remembers which rule of which table it returned (for the next launch's row)."""
        def wrapped(*args, **kwargs):
            rule = config_for(*args, **kwargs)
            table = mod._table()
            key = self.device[0] if self.device[0] in table else "default"
            index = next((i for i, r in enumerate(table.get(key, [])) if r is rule), None)
            self.last_rule = f"{key}[{index}]" if index is not None else None
            return rule
        self.last_rule = None
        return wrapped

    def _runner(self, mod, fn):
        run = type(fn).run
        names = fn.arg_names
        constexprs = {names[i] for i in getattr(fn, "constexprs", [])}

        def compile_only(*args, grid, warmup, **kwargs):
            bound = dict(zip(names, args))
            bound.update({k: v for k, v in kwargs.items() if k in names})
            options = {k: v for k, v in kwargs.items() if k not in names}
            digest, text = specialisation(fn, self.arch, args, kwargs)
            entry = {"kernel": f"{mod.__name__.rsplit('.', 1)[-1]}.{fn.__name__}", "args": bound, "options": options,
                     "constexprs": {k: v for k, v in bound.items() if k in constexprs},
                     "specialisation": digest, "specialisation_text": text, "phase": self.phase,
                     "compiled": None, "error": None, "rule": getattr(self, "last_rule", None)}
            if self.compile_if is None or self.compile_if(digest):
                try:
                    entry["compiled"] = run(fn, *args, grid=grid, warmup=True, **kwargs)
                except Exception as e:  # a compile error is a finding, not a crash of the report
                    entry["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:500]
            else:
                entry["skipped"] = True
            self.launches.append(entry)
            return entry["compiled"]

        return compile_only


def specialisation(fn, arch: int, args, kwargs) -> tuple[str, str]:
    """(digest, text) of the kernel specialisation a launch asks Triton for on `arch`: Triton's own cache key,
    computed as JITFunction.run computes it (the binder's specialisation of every argument: dtypes, constexpr
    values, integers equal to 1 made constexprs, 16-byte alignment of pointers, plus the compile options), with
    the kernel's name, less one thing: whether an integer (a size or stride) is a multiple of 16. That mark only
    changes masks and vector widths within the tile and layout the rest fixes, and keeping it would multiply the
    compiles by every size class a batch can have; unit strides (the transposed operand of dx) and pointer
    alignment stay in."""
    from triton import knobs
    from triton.runtime.jit import compute_cache_key

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    _, kernel_key_cache, _, _, binder = fn.device_caches[arch]  # the stand-in driver's device is the architecture
    _, spec, options = binder(*args, **kwargs)
    key = compute_cache_key(kernel_key_cache, spec, options)
    key = _INT_DIVISIBILITY.sub(r"\1'')", key)
    text = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__} sm_{arch} {key}"
    return hashlib.sha1(text.encode()).hexdigest()[:20], text


# an integer argument's 16-divisibility mark in Triton's key (pointers keep theirs: their alignment picks vector loads)
_INT_DIVISIBILITY = re.compile(r"(\('i(?:32|64)', )'D'\)")


# ---------------------------------------------------------------- reading a cubin


_SASS_OP = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.MULTILINE)


_PTX_PRED = r"^\s*(?:@!?%p\d+\s+)?"
_PTX_VECTOR_LOAD = re.compile(  # ld.global.v2/v4/v8, 8/16-byte cp.async (sm_80 pipelines), TMA bulk copies
    _PTX_PRED + r"(?:ld\.global\S*\.v[248]\.|cp\.async\.c[ag]\.shared\.global\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(?:0x10|0x8|16|8)\b"
    r"|cp\.async\.bulk\.tensor)", re.MULTILINE)
_PTX_GLOBAL_LOAD = re.compile(_PTX_PRED + r"(?:ld\.global|cp\.async\.c[ag]\.shared\.global|cp\.async\.bulk\.tensor)", re.MULTILINE)
# mma.sync (sm_80+), wgmma.mma_async (sm_90), tcgen05.mma (sm_100)
_PTX_TENSOR_CORE = re.compile(_PTX_PRED + r"(?:wgmma\.mma_async|mma\.sync|tcgen05\.mma)\b", re.MULTILINE)
_RESOURCE_CACHE: dict[str, dict] = {}


def _resources(cubin: bytes, ptx: str) -> dict:
    """Registers, spill instructions (STL/LDL), stack from the cubin; tensor-core and vector loads from the PTX."""
    key = hashlib.sha1(cubin).hexdigest()
    if key in _RESOURCE_CACHE:
        return dict(_RESOURCE_CACHE[key])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
        field = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
        spills = 0
        if field.get("STACK", 0) or field.get("LOCAL", 0):  # STL/LDL address local memory: none without a stack
            sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
            spills = sum(op.startswith(("STL", "LDL")) for op in _SASS_OP.findall(sass))
    out = {
        "registers": field.get("REG"),
        "spills": spills,
        "stack_bytes": field.get("STACK", 0),
        "tensor_core_instructions": len(_PTX_TENSOR_CORE.findall(ptx)),
        "vector_loads": len(_PTX_VECTOR_LOAD.findall(ptx)),
        "global_loads": len(_PTX_GLOBAL_LOAD.findall(ptx)),
        "binary": key[:12],
    }
    _RESOURCE_CACHE[key] = out
    return dict(out)


# ---------------------------------------------------------------- compulsory bytes and FLOPs


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _gemm_rate(dtype: torch.dtype, precision: str) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16_flops" if dtype == torch.bfloat16 else "fp16_flops"
    return "tf32_flops" if precision == "tf32" else "fp32_flops"


def _work(kernel: str, a: dict) -> tuple[dict, int, int, str]:
    """(problem, compulsory bytes, FLOPs, peak used for the FLOPs) of one launch from its bound arguments."""
    if kernel == "lora_linear._fused_kernel":
        M, N, K, R = a["M"], a["N"], a["K"], a["R"]
        lora = a["A"].element_size() * R * K if a["FUSE_XA"] else 4 * M * R
        nbytes = (a["X"].element_size() * M * K + a["W"].element_size() * N * K + lora + a["Bp"].element_size() * N * R
                  + (a["BIAS"].element_size() * N if a["HAS_BIAS"] else 0) + a["OUT"].element_size() * M * N)
        flops = 2 * M * N * K + 2 * M * N * R + (2 * M * K * R if a["FUSE_XA"] else 0)
        return {"M": M, "N": N, "K": K, "r": R}, nbytes, flops, _gemm_rate(a["X"].dtype, a["PRECISION"])
    if kernel == "lora_linear._multi_kernel":
        M, N, K, R, NA = a["M"], a["N"], a["K"], a["R"], a["NA"]
        nbytes = (a["X"].element_size() * M * K + a["W"].element_size() * N * K + 4 * M * R + 8 * M
                  + a["Bs"].element_size() * NA * N * R + a["OUT"].element_size() * M * N)
        return ({"M": M, "N": N, "K": K, "r": R, "adapters": NA}, nbytes, 2 * M * N * K + 2 * M * N * R,
                _gemm_rate(a["X"].dtype, a["PRECISION"]))
    if kernel == "lora_linear._tn_kernel":
        M, P, Q = a["M"], a["P"], a["Q"]
        nbytes = a["L"].element_size() * M * P + a["Rt"].element_size() * M * Q + 4 * P * Q
        dtype = a["L"].dtype if not a["UPCAST"] else torch.float32
        return {"M": M, "P": P, "Q": Q}, nbytes, 2 * M * P * Q, _gemm_rate(dtype, a["PRECISION"])
    if kernel == "augment_mix._augment_mix_kernel":
        B, size = a["INDEX"].shape[0], a["out_size"]
        crop = a["CROP"]
        area = int((crop[:, 2] * crop[:, 3]).sum())
        reads = 3 * area * (2 if a["MODE"] == 1 else 1)  # each source pixel of a crop once (both samples for Mixup)
        outs = [a[f"OUT{v}"] for v in range(a["NUM_VIEWS"])]
        writes = sum(o.element_size() * B * 3 * size * size for o in outs)
        per_px = 3 * (14 * (2 if a["MODE"] == 1 else 1) + 3 * len(outs))  # bilinear taps + normalise, per channel
        maps = 4 * B * (a["rows_n"] + a["cols_n"]) if a["SHUFFLE"] else 0  # the strip maps (int32)
        return ({"batch": B, "out_size": size, "crop_pixels": area // B, "views": len(outs)}, reads + writes + maps + 8 * 10 * B,
                per_px * B * size * size, "fp32_flops")
    if kernel == "soft_label_loss._soft_label_loss_kernel":
        B, C = a["B"], a["C"]
        es = a["S"].element_size()
        nbytes = es * B * C * (1 + int(a["HAS_TARGET"]) + int(a["WITH_GRAD"])) + B * (8 + 8 + 4 + 8)
        per = (8 if a["KL"] else 4) * int(a["HAS_TARGET"]) + 8 * int(a["WITH_CE"])
        return {"batch": B, "classes": C}, nbytes, per * B * C, "fp32_flops"
    raise KeyError(kernel)


def roofline_us(nbytes: int, flops: int, rate: str) -> dict:
    """Lower bound on the time (microseconds) per GPU: the slower of moving the bytes and doing the FLOPs at peak."""
    return {gpu: round(1e6 * max(nbytes / p["bytes_per_s"], flops / p[rate]), 3) for gpu, p in PEAKS.items()}


# ---------------------------------------------------------------- scenarios


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _set_fp32_precision(precision: str) -> None:
    allow = precision == "tf32"
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: the new switch, set alone so the two never disagree
        matmul.fp32_precision = "tf32" if allow else "ieee"
    else:
        matmul.allow_tf32 = allow


def lora_tables() -> dict:
    """The config tables of kernels/configs/lora_linear.json: {table key: rules} (GPU tables only)."""
    from importlib import resources

    with resources.files("hello_fast.kernels").joinpath("configs", "lora_linear.json").open() as f:
        table = json.load(f)
    return {k: v for k, v in table.items() if isinstance(v, list) and not k.startswith(("_", "interpreter")) and k != "reduction"}


def _table_archs(key: str, archs) -> list[int]:
    from importlib import resources

    with resources.files("hello_fast.kernels").joinpath("configs", "lora_linear.json").open() as f:
        named = json.load(f).get("_device_arch", {})
    return list(archs) if key == "default" else [a for a in archs if a == named.get(key)]


def _rule_combos(rule: dict) -> list[tuple[str, str]]:
    """(dtype, precision) pairs a rule can serve: 16-bit GEMMs run their fp32 LoRA products in TF32."""
    out = []
    for dt in rule.get("dtypes", ["float32", "float16", "bfloat16"]):
        for prec in (["tf32", "ieee"] if dt == "float32" else ["tf32"]):
            if rule.get("precision", prec) == prec:
                out.append((dt, prec))
    return out


def enumerate_scenarios(archs, *, full: bool = True) -> list[dict]:
    """Every op call whose Triton launches the report compiles; `full=False`: the default fast path of each kernel.

    lora_linear: each rule of each device table, on the architectures the table serves, for each
    (dtype, precision) and operand alignment the rule serves and no earlier rule takes, through the
    forward (rank 8: x A^T fused; rank 128: precomputed), the backward and the multi-adapter kernel.
    """
    from hello_fast.kernels.lora_linear import (
        _matches,  # imports triton; nothing is compiled in this process
    )

    out = []
    for arch in archs:
        for key, rules in lora_tables().items():
            if arch not in _table_archs(key, archs):
                continue
            for i, rule in enumerate(rules):
                for dt, prec in _rule_combos(rule):
                    for aligned in ([rule["aligned"]] if "aligned" in rule else [True, False]):
                        for part in ("forward", "backward", "multi"):
                            for rank in (LORA_RANKS if part != "multi" else (LORA_RANKS[-1],)):
                                rows, n = _lora_rows(rule), max(rule.get("min_n", 0), LORA_N)
                                if any(_matches(earlier, rows, n, rank, _dtype(dt), prec, aligned) for earlier in rules[:i]):
                                    continue  # an earlier rule serves this problem: the rule is never launched for it
                                out.append({"op": "lora_linear", "arch": arch, "table": key, "rule": i, "dtype": dt,
                                            "precision": prec, "aligned": aligned, "part": part, "rank": rank})
        for mode in ("none", "mixup", "cutmix"):
            for views in (1, 2, 3, 4):
                for cl in (False, True):
                    # the view dtype changes only the final store: ShufflePatches is compiled with bf16 views
                    for dt, shuffle in (("float32", False), ("float16", False), ("bfloat16", False), ("bfloat16", True)):
                        out.append({"op": "augment_mix", "arch": arch, "mode": mode, "views": views,
                                    "channels_last": cl, "dtype": dt, "shuffle": shuffle})
        for mode in ("mse", "kl", "ce"):
            for beta in ((0.0, 1.0) if mode != "ce" else (1.0,)):
                for classes in LOSS_CLASSES:
                    for dt in ("float32", "bfloat16"):
                        out.append({"op": "soft_label_loss", "arch": arch, "mode": mode, "beta": beta,
                                    "classes": classes, "dtype": dt, "with_grad": True})
    return out if full else [s for s in out if _quick(s)]


def _quick(s: dict) -> bool:
    """The default fast path of each kernel: bf16 and TF32 LoRA at the small-batch rule (its backward reaches
    the unaligned rule through dy's 1000 columns), 2 and 4 channels-last bf16 views in every mode (4, also
    with ShufflePatches: the most registers), every loss mode at 1000 classes in bf16 and 21843 in fp32."""
    if s["op"] == "lora_linear":
        rule = lora_tables()[s["table"]][s["rule"]]
        small_aligned = s["table"] == "default" and s["aligned"] and "min_rows" not in rule
        return small_aligned and (s["dtype"] == "bfloat16" or (s["dtype"] == "float32" and s["precision"] == "tf32"
                                                               and s["rank"] == 128 and s["part"] != "multi"))
    if s["op"] == "augment_mix":
        return s["views"] in (2, 4) and s["channels_last"] and s["dtype"] == "bfloat16" and (s["views"] == 4 or not s["shuffle"])
    return (s["classes"], s["dtype"]) in ((1000, "bfloat16"), (21843, "float32"))


def _lora_rows(rule: dict) -> int:
    return max(rule.get("min_rows", 0), LORA_ROWS)


def _lora_launches(s: dict):
    from hello_fast.kernels import lora_linear as kern

    importlib.import_module("hello_fast.ops.lora_linear")  # declares torch.ops.hello_fast.lora_linear, the Triton path
    rules = lora_tables()[s["table"]]
    rule = rules[s["rule"]]
    dt = _dtype(s["dtype"])
    _set_fp32_precision(s["precision"])
    rows = _lora_rows(rule)
    r, K, N = s["rank"], LORA_K if s["aligned"] else LORA_K_UNALIGNED, max(rule.get("min_n", 0), LORA_N)
    device = torch.device("cpu")
    chosen = kern.config_for(device, rows, N, K, r, dt, kern.precision_for(dt), s["aligned"])
    if chosen != rule:
        return f"unreachable: {s['table']}[{s['rule']}] is shadowed by an earlier rule at rows={rows}, r={r}"
    x = torch.empty(rows, K, dtype=dt)
    w = torch.empty(N, K, dtype=dt)
    bias = torch.empty(N, dtype=dt)
    if s["part"] == "multi":
        a = torch.empty(MULTI_ADAPTERS, r, K)
        b = torch.empty(MULTI_ADAPTERS, N, r)
        h = torch.empty(rows, r)
        kern.multi(x, w, h, torch.zeros(rows, dtype=torch.long), b, bias)
        return None
    a = torch.empty(r, K)  # the projector keeps its adapters in fp32 (hello_fast.projector.lora)
    b = torch.empty(N, r)
    if s["part"] == "forward":
        torch.ops.hello_fast.lora_linear(x, w, a, b, 1.0, bias)  # the op the dispatcher calls for "triton"
        return None
    xg, ag, bg = (t.requires_grad_(True) for t in (x, a, b))
    out = torch.ops.hello_fast.lora_linear(xg, w, ag, bg, 1.0, bias)
    # only the backward's launches are this scenario's
    return ("backward", lambda: torch.autograd.grad(out, [xg, ag, bg], torch.empty(rows, N, dtype=dt)))


def _augment_launches(s: dict):
    from hello_fast.kernels import augment_mix as kern

    B = AUG_BATCH
    src = torch.empty(16, 3, AUG_SRC, AUG_SRC, dtype=torch.uint8)
    crop = torch.tensor([[0, 0, AUG_CROP, AUG_CROP]] * B)
    cut = torch.tensor([[16, 16, 128, 128]] * B)
    views = [([0.5, 0.5, 0.5], [0.25, 0.25, 0.25], _dtype(s["dtype"]))] * s["views"]
    # RDED's ShufflePatches with factor 2: each sample's row and column strip orders
    shuffle = torch.tensor([[[1, 0], [1, 0]]] * B) if s["shuffle"] else None
    kern.augment_mix(src, torch.zeros(B, dtype=torch.long), crop, torch.zeros(B, dtype=torch.bool),
                     torch.arange(B), torch.full((B,), 0.7), cut, s["mode"], AUG_OUT, views, s["channels_last"],
                     shuffle=shuffle)


def _loss_launches(s: dict):
    from hello_fast.kernels import soft_label_loss as kern

    B, C = LOSS_BATCH, s["classes"]
    dt = _dtype(s["dtype"])
    student = torch.empty(B, C, dtype=dt)
    target = None if s["mode"] == "ce" else torch.empty(B, C, dtype=dt)
    kern.soft_label_loss(student, target, torch.zeros(B, dtype=torch.long), torch.arange(B), torch.ones(B),
                         "kl" if s["mode"] == "kl" else "mse", 4.0, s["beta"], s["with_grad"])


_ROLES = {  # what each launch of a lora_linear scenario computes, in launch order
    ("forward", "fused"): ["y = x W^T + s (x A^T) B^T + b (x A^T in-program)"],
    ("forward", "precomputed"): ["H = s x A^T (fp32)", "y = x W^T + H B^T + b"],
    ("backward", None): ["G = s dy B (fp32)", "dx = dy W + G A", "dA = G^T x", "H = x A^T (fp32)", "dB = s dy^T H"],
    ("multi", None): ["y = x W^T + b + H[m] B[idx[m]]^T"],
}


_EMPTY_ROW = {k: None for k in ("kernel", "arch", "config", "dtype", "fast_path", "registers", "spills", "smem_bytes",
                                 "smem_limit", "tensor_core_instructions", "vector_loads", "error", "roofline_us", "launch")}


def _fast_path(s: dict) -> bool:
    """Whether the package launches this scenario's kernels by default on a GPU (asked of the op itself)."""
    if s["op"] == "lora_linear":
        op = importlib.import_module("hello_fast.ops.lora_linear")
        _set_fp32_precision(s["precision"])
        return op._triton_is_fast(_dtype(s["dtype"]))  # fp32 with IEEE precision: the op runs cuBLAS
    return True  # augment_mix and soft_label_loss launch Triton on CUDA devices in every mode


def _describe(s: dict) -> str:
    skip = ("op", "arch")
    return " ".join(f"{k}={v}" for k, v in s.items() if k not in skip)


def run_scenario(s: dict) -> list[dict]:
    """Compile one scenario for its architecture (in a worker process); one row per Triton launch."""
    import triton
    from hello_fast.kernels import augment_mix, lora_linear, soft_label_loss

    arch = s["arch"]
    if s["op"] == "lora_linear" and s["table"] != "default":
        device = (s["table"], _NAMED_SMS.get(s["table"], 132))
    else:
        device = (f"(any sm_{arch} GPU)", _DEFAULT_DEVICE.get(arch, 132))
    modules = (lora_linear, augment_mix, soft_label_loss)
    build = {"lora_linear": _lora_launches, "augment_mix": _augment_launches, "soft_label_loss": _loss_launches}[s["op"]]
    with _Capture(arch, modules, *device) as cap:
        result = build(s)
        if isinstance(result, tuple):  # the backward: record only its own launches
            cap.launches.clear()
            result[1]()
            result = None
    base = {"op": s["op"], "arch": arch, "scenario": _describe(s), "dtype": s["dtype"],
            "precision": s.get("precision"), "fast_path": _fast_path(s), "toolchain": f"triton {triton.__version__}"}
    if isinstance(result, str):
        return [{**_EMPTY_ROW, **base, "kernel": s["op"], "error": result, "smem_limit": SMEM_LIMIT.get(arch)}]
    roles = None
    if s["op"] == "lora_linear":
        variant = "fused" if s["part"] == "forward" and s["rank"] <= lora_tables()[s["table"]][s["rule"]].get("fuse_xa_max_rank", 0) else "precomputed"
        roles = _ROLES[(s["part"], variant if s["part"] == "forward" else None)]
    return [launch_row(launch, base, arch, roles[i] if roles and i < len(roles) else None)
            for i, launch in enumerate(cap.launches)]


def launch_row(launch: dict, base: dict, arch: int, role: str | None) -> dict:
    """The report's row of one recorded launch: its configuration, the compiled kernel's resources, its roofline."""
    args = launch["args"]
    constexpr = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in launch["constexprs"].items()}
    config = {**constexpr, **{k: launch["options"][k] for k in ("num_warps", "num_stages") if k in launch["options"]}}
    if launch["kernel"] in ("lora_linear._fused_kernel", "lora_linear._multi_kernel"):
        config["rule"] = launch["rule"]  # the rule config_for returned for this launch (dx may differ from the forward's)
    row = {**base, "kernel": launch["kernel"], "launch": role, "config": config, "error": launch["error"],
           "smem_limit": SMEM_LIMIT.get(arch), "specialisation": launch["specialisation"]}
    k = launch["compiled"]
    if k is not None:
        res = _resources(k.asm["cubin"], k.asm["ptx"])
        row.update(res)
        row["smem_bytes"] = int(k.metadata.shared)
        if row["smem_limit"] is not None and row["smem_bytes"] > row["smem_limit"]:
            row["error"] = f"OutOfResources: {row['smem_bytes']} B of shared memory, over the {row['smem_limit']} B of sm_{arch}"
    else:
        row = {**_EMPTY_ROW, **row}
    problem, nbytes, flops, rate = _work(launch["kernel"], args)
    row.update({"problem": problem, "compulsory_bytes": nbytes, "flops": flops, "flops_at": rate,
                "roofline_us": roofline_us(nbytes, flops, rate)})
    return row


def _init_worker() -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported in this process
    torch.set_num_threads(1)


def _run_guarded(group: list[dict]) -> list[list[dict]]:
    out = []
    for s in group:
        try:
            out.append(run_scenario(s))
        except Exception as e:  # a scenario that cannot even be set up is reported, not fatal
            out.append([{**_EMPTY_ROW, "op": s["op"], "arch": s["arch"], "scenario": _describe(s), "kernel": s["op"],
                         "dtype": s.get("dtype"), "fast_path": None, "error": f"{type(e).__name__}: {e}"[:500],
                         "smem_limit": SMEM_LIMIT.get(s["arch"])}])
    return out


def _group_key(s: dict) -> tuple:
    """Scenarios that share kernels run in one process, so that each kernel compiles once (Triton's in-process cache)."""
    if s["op"] == "lora_linear":
        return (s["arch"], s["op"], s["table"], s["rule"], s["dtype"], s["precision"])
    if s["op"] == "augment_mix":
        return (s["arch"], s["op"], s["mode"], s["views"], s["shuffle"])
    return (s["arch"], s["op"], s["mode"], s["beta"])


def compile_scenarios(scenarios: list[dict], workers: int = 2, progress=None) -> list[dict]:
    """Compile every scenario in `workers` fresh processes (TRITON_INTERPRET off there); rows in scenario order."""
    reason = api_missing()
    if reason:
        raise RuntimeError(reason)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(scenarios):
        groups.setdefault(_group_key(s), []).append(i)
    # the costliest (the GEMMs) first, so that the workers finish together
    order = sorted(groups.values(), key=lambda idx: scenarios[idx[0]]["op"] != "lora_linear")
    results: list = [None] * len(scenarios)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
        futures = {pool.submit(_run_guarded, [scenarios[i] for i in idx]): idx for idx in order}
        done = 0
        for fut in concurrent.futures.as_completed(futures):
            for i, rows in zip(futures[fut], fut.result()):
                results[i] = rows
            done += len(futures[fut])
            if progress:
                progress(done, len(scenarios))
    return [row for rows in results for row in rows]


def nvcc_resource_usage(sources, arch: int = 90) -> list[dict]:
    """Per kernel of plain-CUDA .cu files: registers, spills (STL/LDL in the SASS), stack and smem, from nvcc -cubin.

    The build is `nvcc -gencode arch=compute_XX,code=sm_XX -O3 --use_fast_math (setup.py's flags)
    --resource-usage -Xptxas -warn-spills,-warn-lmem-usage` (no torch headers: about a second per
    file); ptxas' spill warnings are kept with each row.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [{"kernel": "cuda:*", "arch": arch, "error": "nvcc is not on the PATH"}]
    rows = []
    for src in sources:
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            proc = subprocess.run(
                [nvcc, "-cubin", "-o", cubin, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-O3", "--use_fast_math",
                 "-std=c++17", "--resource-usage", "-Xptxas", "-warn-spills,-warn-lmem-usage", src],
                capture_output=True, text=True, check=False)  # a failed build is a row, not an exception
            log = proc.stdout + proc.stderr
            if proc.returncode != 0:
                rows.append({"kernel": f"cuda:{os.path.basename(src)}", "arch": arch, "source": os.path.basename(src),
                             "error": log.strip()[-500:]})
                continue
            sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
        rows.extend(_ptxas_rows(log, sass, arch, os.path.basename(src)))
    return rows


def _short_name(demangled: str) -> str:
    """`void ns::(anonymous namespace)::kernel<float>(Args)` -> `kernel<float>`."""
    name = demangled.replace("(anonymous namespace)", "anon").split("(", 1)[0].strip()
    name = name.removeprefix("void ").strip()
    depth, cut = 0, 0
    for i, ch in enumerate(name):  # after the last `::` outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == ":" and depth == 0 and name[i - 1:i + 1] == "::":
            cut = i + 1
    return name[cut:]


def _ptxas_rows(log: str, sass: str, arch: int, source: str) -> list[dict]:
    stats: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            current = stats.setdefault(m.group(1), {"warnings": []})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack_bytes=int(m.group(1)), spill_bytes=int(m.group(2)) + int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            smem = re.search(r"(\d+) bytes smem", line)
            current.update(registers=int(m.group(1)), smem_bytes=int(smem.group(1)) if smem else 0)
        if "warning" in line.lower():
            current["warnings"].append(line.strip())
    per_function = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = block.split("\n", 1)
        ops = _SASS_OP.findall(body)
        per_function[name.strip()] = {
            "spills": sum(op.startswith(("STL", "LDL")) for op in ops),
            "tensor_core_instructions": sum(op.startswith(("HMMA", "HGMMA", "IMMA")) for op in ops),
            # from the SASS here (nvcc's PTX is not at hand): 64/128-bit global loads
            "vector_loads": sum(op.startswith("LDG") and bool(re.search(r"\.(64|128)\b", op)) for op in ops),
            "global_loads": sum(op.startswith("LDG") for op in ops),
        }
    names = list(stats)
    filt = shutil.which("c++filt")
    demangled = names
    if filt and names:
        out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=False).stdout.splitlines()
        demangled = out if len(out) == len(names) else names
    rows = []
    dtypes = {"float": "float32", "__half": "float16", "__nv_bfloat16": "bfloat16"}
    for mangled, pretty in zip(names, demangled):
        st = stats[mangled]
        short = _short_name(pretty)
        template = re.search(r"<(.+)>$", short)
        sass_stats = per_function.get(mangled, {})
        rows.append({"kernel": f"cuda:{short}", "arch": arch, "config": {"source": f"csrc/ops/cuda/{source}"},
                     "dtype": dtypes.get(template.group(1)) if template else None, "fast_path": None,
                     "registers": st.get("registers"), "spills": sass_stats.get("spills"), "spill_bytes": st.get("spill_bytes"),
                     "stack_bytes": st.get("stack_bytes"), "smem_bytes": st.get("smem_bytes"), "smem_limit": SMEM_LIMIT.get(arch),
                     "tensor_core_instructions": sass_stats.get("tensor_core_instructions"),
                     "vector_loads": sass_stats.get("vector_loads"), "global_loads": sass_stats.get("global_loads"),
                     "error": None, "roofline_us": None, "source": source, "ptxas_warnings": st["warnings"],
                     "toolchain": _nvcc_version()})
    return rows


def _nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"release ([\d.]+)", out)
    return f"nvcc {m.group(1)}" if m else None


# ---------------------------------------------------------------- the report


ROOFLINE_ASSUMES = ("max(bytes/BW, FLOPs/peak); H100 SXM 3.35 TB/s, H200 4.8 TB/s; "
                    "TFLOP/s dense: 989 bf16/fp16, 494 tf32, 67 fp32")


def _is_16bit_gemm(row: dict) -> bool:
    return row["kernel"] in ("lora_linear._fused_kernel", "lora_linear._multi_kernel") and row.get("dtype") in ("bfloat16", "float16")


def violations(rows: list[dict]) -> list[str]:
    """What the tests hold the line on: compile errors, shared memory over the limit, spills on a fast
    path, 16-bit LoRA GEMMs without tensor-core instructions (Triton rows; cuda: rows only for spills)."""
    out = []
    for r in rows:
        where = f"{r['kernel']} sm_{r['arch']} {r.get('scenario') or r.get('source', '')} {r.get('launch') or ''}".strip()
        if r.get("error"):
            out.append(f"{where}: {r['error']}")
            continue
        if r.get("smem_bytes") is not None and r.get("smem_limit") is not None and r["smem_bytes"] > r["smem_limit"]:
            out.append(f"{where}: {r['smem_bytes']} B shared memory > {r['smem_limit']}")
        if (r.get("fast_path") or r["kernel"].startswith("cuda:")) and r.get("spills"):
            out.append(f"{where}: {r['spills']} spill instructions on a fast path")
        if _is_16bit_gemm(r) and not r.get("tensor_core_instructions"):
            out.append(f"{where}: no tensor-core instructions in a 16-bit GEMM")
    return out


def summary_table(rows: list[dict]) -> str:
    """Markdown: one line per kernel and architecture (registers/spills/smem over its variants)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    lines = ["| kernel | arch | variants (fast path) | registers, max (fast path) | spill instr., fast path / all | "
             "smem max / limit (B) | tensor-core instr. (16-bit GEMMs, min) | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for (kernel, arch), rs in sorted(groups.items(), key=lambda kv: (kv[0][0].startswith("cuda:"), kv[0])):
        ok = [r for r in rs if not r.get("error")]
        fast = [r for r in ok if r.get("fast_path") or kernel.startswith("cuda:")]
        def mx(key, among):
            vals = [r[key] for r in among if r.get(key) is not None]
            return max(vals) if vals else None
        tc = [r["tensor_core_instructions"] for r in ok if _is_16bit_gemm(r)]
        spill_fast = sum(r.get("spills") or 0 for r in fast)
        spill_all = sum(r.get("spills") or 0 for r in ok)
        lines.append(
            f"| `{kernel}` | sm_{arch} | {len(rs)} ({len(fast)}) | {mx('registers', ok)} ({mx('registers', fast)}) | "
            f"{spill_fast} / {spill_all} | {mx('smem_bytes', ok)} / {rs[0].get('smem_limit')} | "
            f"{min(tc) if tc else '-'} | {sum(1 for r in rs if r.get('error'))} |")
    return "\n".join(lines)


def slow_variants_table(rows: list[dict]) -> str:
    """Markdown: the variants that spill (none may be a fast path)."""
    spilling = [r for r in rows if (r.get("spills") or 0) > 0]
    if not spilling:
        return "No variant spills."
    lines = ["| kernel | arch | variant | registers | spill instr. | fast path |", "|---|---|---|---|---|---|"]
    for r in spilling:
        lines.append(f"| `{r['kernel']}` | sm_{r['arch']} | {r.get('scenario') or r.get('source')} {r.get('launch') or ''} | "
                     f"{r.get('registers')} | {r['spills']} | {'yes' if r.get('fast_path') else 'no'} |")
    return "\n".join(lines)


def write_json(rows: list[dict], path: str) -> None:
    """A JSON list, one row per line (readable diffs)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, separators=(",", ":")) for r in rows) + "\n]\n")

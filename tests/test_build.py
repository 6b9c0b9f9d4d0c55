"""The csrc build: CPU kernels that run on any x86-64 CPU with a runtime-chosen AVX2 build, CMake (Torch's package +
pybind11) with ctest, setup.py's FORCE_CUDA build of the CUDA kernels, and one version source."""
import bisect
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import hello_fast
from hello_fast import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X86 = platform.machine().lower() in ("x86_64", "amd64")
# the CPU builds' namespaces (csrc/cpu_dispatch.h), demangled and mangled (objdump leaves OpenMP's outlined
# `..._omp_fn.0` functions mangled)
AVX2_NAMESPACE = ("hello_fast::cpu_avx2::", "10hello_fast8cpu_avx2")
GENERIC_NAMESPACE = ("hello_fast::cpu_default::", "10hello_fast11cpu_default")
# an instruction a CPU without AVX cannot run: VEX/EVEX-encoded (every such mnemonic starts with v) or a 256/512-bit
# or mask register operand
_AVX = re.compile(r"^v|%[yz]mm\d|%k[0-7]\b")
_BRANCH = re.compile(r"^(?:call|j[a-z]+)\s+([0-9a-f]+) <")


def _functions(so_path):
    """{address: (demangled name, is local symbol, AVX mnemonics (+ "%ymm" if it uses 256-bit registers),
    direct branch target addresses)}."""
    dis = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", so_path], capture_output=True, text=True,
                         check=True).stdout
    nm = subprocess.run(["nm", "--defined-only", so_path], capture_output=True, text=True, check=True).stdout
    global_at = {int(a, 16) for a, kind, *_ in (line.split() for line in nm.splitlines()) if kind in "TWiV"}
    funcs, cur = {}, None
    for line in dis.splitlines():
        head = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if head:
            cur = int(head.group(1), 16)
            funcs[cur] = (head.group(2), cur not in global_at, set(), set())
            continue
        parts = line.split("\t")
        if cur is None or len(parts) < 2 or not parts[1].strip():
            continue
        ins = parts[1].strip()
        if _AVX.search(ins):
            funcs[cur][2].add(ins.split()[0])
            if "%ymm" in ins:
                funcs[cur][2].add("%ymm")
        target = _BRANCH.match(ins)
        if target:
            funcs[cur][3].add(int(target.group(1), 16))
    return funcs


def _in(namespace, name):
    return any(n in name for n in namespace)


def _generic_path_avx_leaks(funcs):
    """The functions a generic caller can reach that use AVX: every one outside the AVX2 build's namespace, except
    compiler-made local copies (`[clone .isra.0]`, `.cold`, static helpers) branched to only from AVX2 code."""
    starts = sorted(funcs)
    callers = {a: set() for a in funcs}
    for a, (_, _, _, targets) in funcs.items():
        for t in targets:
            i = bisect.bisect_right(starts, t) - 1
            if i >= 0 and starts[i] != a:
                callers[starts[i]].add(a)
    avx2_only = {a for a, f in funcs.items() if _in(AVX2_NAMESPACE, f[0])}
    changed = True
    while changed:  # local functions whose every caller is AVX2-only are AVX2-only too
        changed = False
        for a, (name, local, _, _) in funcs.items():
            if a not in avx2_only and local and callers[a] and callers[a] <= avx2_only:
                avx2_only.add(a)
                changed = True
    return sorted(f"{funcs[a][0][:160]}: {sorted(funcs[a][2])[:6]}" for a in funcs if funcs[a][2] and a not in avx2_only)


def _check_cpu_builds(so_path, expect_avx2=True):
    funcs = _functions(so_path)
    generic = [f for f in funcs.values() if _in(GENERIC_NAMESPACE, f[0])]
    assert generic, "no generic CPU kernels (hello_fast::cpu_default) in the extension"
    leaks = _generic_path_avx_leaks(funcs)
    assert not leaks, "AVX instructions where a CPU without AVX would run them:\n" + "\n".join(leaks[:20])
    avx2 = [f for f in funcs.values() if _in(AVX2_NAMESPACE, f[0])]
    if expect_avx2:
        used = set().union(*(f[2] for f in avx2))
        assert any(m.startswith("vfmadd") for m in used), "the AVX2 build is missing or uses no FMA"
        assert "%ymm" in used, "the AVX2 build uses no 256-bit registers"
    else:
        assert not avx2


def _installed_extension():
    if os.environ.get("HELLO_FAST_SKIP_EXT") == "1":
        pytest.skip("built without the extension on purpose")
    spec = importlib.util.find_spec("hello_fast._C")
    assert spec is not None and spec.origin, "hello_fast._C is not built"
    return spec.origin


def _cpu_has_avx2():
    with open("/proc/cpuinfo") as f:
        flags = set(f.read().split())
    return {"avx2", "fma", "f16c"} <= flags


def _expect_avx2_build():
    """Every build but HELLO_FAST_CPU_ARCH=generic has an AVX2 build of the CPU kernels on x86-64."""
    return X86 and os.environ.get("HELLO_FAST_CPU_ARCH", "dispatch") in ("", "dispatch", "native")


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="x86-64 with binutils' objdump only")
def test_generic_cpu_path_has_no_avx_and_the_avx2_build_is_there():
    """A wheel built on an AVX2 machine runs on a CPU without AVX: the generic kernels and everything a generic
    caller reaches are free of AVX instructions; the AVX2 build exists and uses FMA and 256-bit registers."""
    if os.environ.get("HELLO_FAST_CPU_ARCH") == "native":
        pytest.skip("built with HELLO_FAST_CPU_ARCH=native: for this machine's CPU on purpose")
    _check_cpu_builds(_installed_extension(), expect_avx2=_expect_avx2_build())


def test_the_kernels_run_the_best_build_this_cpu_supports():
    _installed_extension()
    _C = _extension.load()
    built = _C.cpu_capabilities()
    assert built[0] == "default"
    assert ("avx2" in built) == _expect_avx2_build()
    if "HELLO_FAST_CPU_CAPABILITY" not in os.environ:
        assert _C.cpu_capability() == ("avx2" if "avx2" in built and _cpu_has_avx2() else "default")


_RUN_OPS = """
import sys, torch
from hello_fast import _extension
from hello_fast.ops import augment_mix, soft_label_loss
inputs = torch.load(sys.argv[1])
out = {"capability": _extension.load().cpu_capability(), "torch_capability": torch.backends.cpu.get_cpu_capability()}
for i, (args, kw) in enumerate(inputs["augment"]):
    views, _ = augment_mix(*args, **kw, backend="cpp")
    out[f"augment{i}"] = [v.float() for v in views]
for i, (args, kw) in enumerate(inputs["loss"]):
    s = args[0].clone().requires_grad_(True)
    loss = soft_label_loss(s, *args[1:], **kw, backend="cpp")
    out[f"loss{i}"] = [loss.detach(), torch.autograd.grad(loss, [s])[0].float()]
torch.save(out, sys.argv[2])
"""


def _op_inputs(g):
    from hello_fast.ops import sample_augment_params

    student = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), torch.float32)
    clip = ((0.481, 0.458, 0.408), (0.269, 0.261, 0.276), torch.bfloat16)
    augment = []
    for B, S, H, W, out, mode in ((5, 7, 37, 53, 29, "cutmix"), (3, 4, 64, 48, 41, "mixup")):
        src = torch.randint(0, 256, (S, 3, H, W), dtype=torch.uint8, generator=g)
        index = torch.randint(0, S, (B,), generator=g)
        p = sample_augment_params(index, H, W, out_size=out, scale=(0.3, 1.0), mode=mode, generator=g)
        augment.append(((src, index, p["crop"], p["flip"], p["partner"], p["lam"], p["cut"]),
                        {"mode": mode, "out_size": out, "views": [student, clip]}))
    loss = []
    for B, C, dtype, mode, temperature in ((7, 1001, torch.float32, "kl", 4.0), (5, 37, torch.bfloat16, "mse", 1.0),
                                           (3, 9, torch.float32, "kl", 1.0)):
        s = (torch.randn(B, C, generator=g) * 3).to(dtype)
        t = (torch.randn(B, C, generator=g) * 3).to(dtype)
        lam = torch.rand(B, generator=g)
        loss.append(((s, t, torch.randint(0, C, (B,), generator=g), torch.randperm(B, generator=g), lam),
                     {"mode": mode, "temperature": temperature, "beta": 0.3}))
    return {"augment": augment, "loss": loss}


def _run_ops(tmp_path, inputs_path, capability=None, emulator=()):
    """The csrc ops' outputs on the inputs, in a fresh process (HELLO_FAST_CPU_CAPABILITY=capability if given,
    under `emulator` if given)."""
    out = tmp_path / f"out_{capability}_{len(emulator)}.pt"
    env = {k: v for k, v in os.environ.items() if k != "HELLO_FAST_CPU_CAPABILITY"}
    if capability:
        env["HELLO_FAST_CPU_CAPABILITY"] = capability
    r = subprocess.run([*emulator, sys.executable, "-c", _RUN_OPS, str(inputs_path), str(out)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"exit status {r.returncode} (-4: SIGILL)\n" + r.stderr[-3000:]
    return torch.load(out)


def _assert_same_outputs(a, b):
    for key in a:
        if key.endswith("capability"):
            continue
        for i, (x, y) in enumerate(zip(a[key], b[key])):
            # the bf16 view (index 1) may round one ulp apart at 2^-7 relative
            tol = 2**-7 if key.startswith("augment") and i == 1 else 2e-5
            torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=lambda m: f"{key}[{i}]: {m}")


@pytest.mark.skipif(not X86, reason="the AVX2 build exists on x86-64 only")
def test_generic_and_avx2_builds_agree(tmp_path, rng):
    """HELLO_FAST_CPU_CAPABILITY=default forces the generic kernels; on random odd-sized inputs they give the AVX2
    build's results (up to float rounding: FMA contraction, vector exp)."""
    _installed_extension()
    _C = _extension.load()
    if "avx2" not in _C.cpu_capabilities() or not _cpu_has_avx2():
        pytest.skip("needs the AVX2 build and a CPU that runs it")
    inputs = tmp_path / "inputs.pt"
    torch.save(_op_inputs(rng), inputs)
    generic, avx2 = _run_ops(tmp_path, inputs, "default"), _run_ops(tmp_path, inputs, "avx2")
    assert (generic["capability"], avx2["capability"]) == ("default", "avx2")
    _assert_same_outputs(generic, avx2)


@pytest.mark.slow
@pytest.mark.skipif(not X86 or shutil.which("qemu-x86_64") is None,
                    reason="needs qemu-user (apt-get install qemu-user) on x86-64")
def test_runs_on_an_emulated_cpu_without_avx(tmp_path, rng):
    """The installed extension under qemu's Nehalem model (SSE4.2, no AVX; qemu raises SIGILL on an AVX instruction):
    it picks the generic kernels by itself and gives the same results as on this machine."""
    if os.environ.get("HELLO_FAST_CPU_ARCH") == "native":
        pytest.skip("built with HELLO_FAST_CPU_ARCH=native: for this machine's CPU on purpose")
    _installed_extension()
    inputs = tmp_path / "inputs.pt"
    torch.save(_op_inputs(rng), inputs)
    old = _run_ops(tmp_path, inputs, emulator=("qemu-x86_64", "-cpu", "Nehalem"))
    assert old["torch_capability"] in ("DEFAULT", "NO AVX"), f"the emulated CPU has {old['torch_capability']}"
    assert old["capability"] == "default"
    _assert_same_outputs(old, _run_ops(tmp_path, inputs))


def test_bad_cpu_capability_override_is_a_clear_error():
    _installed_extension()
    env = dict(os.environ, HELLO_FAST_CPU_CAPABILITY="avx9")
    r = subprocess.run([sys.executable, "-c", "from hello_fast import _extension; _extension.load().cpu_capability()"], env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "HELLO_FAST_CPU_CAPABILITY must be 'default' or 'avx2', got 'avx9'" in r.stderr


def test_one_version_source():
    """pyproject's version is hello_fast.__version__ (dynamic), so the installed metadata says the same."""
    assert importlib.metadata.version("hello_fast") == hello_fast.__version__
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    assert re.search(r'^version\s*=\s*"', text, re.M) is None, "a second version string in pyproject.toml"


@pytest.mark.slow
def test_cmake_build_and_ctest(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = subprocess.run(["cmake", "-S", ROOT, "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release"],
                         capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    jobs = str(max(1, os.cpu_count() or 1))
    b = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True, text=True)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    t = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True)
    assert t.returncode == 0, t.stdout[-3000:] + t.stderr[-3000:]
    assert "100% tests passed" in t.stdout
    if X86:  # the C++ tests also ran on the generic kernels
        assert "augment_mix_generic" in t.stdout and "soft_label_loss_generic" in t.stdout
    built = [f for f in os.listdir(build) if f.startswith("_C") and f.endswith(".so")]
    assert built
    # CMake takes setup.py's CPU builds: the same generic + AVX2 split
    if X86 and shutil.which("objdump") and os.environ.get("HELLO_FAST_CPU_ARCH") != "native":
        _check_cpu_builds(str(build / built[0]), expect_avx2=_expect_avx2_build())


def _nvcc_available() -> bool:
    return shutil.which("nvcc") is not None or os.path.isfile("/usr/local/cuda/bin/nvcc") or bool(os.environ.get("CUDA_HOME"))


@pytest.mark.slow
def test_cuda_sources_build_with_force_cuda(tmp_path):
    """FORCE_CUDA=1 builds the whole extension with the CUDA kernels for one arch, as on a GPU machine."""
    if not _nvcc_available():
        pytest.skip("no CUDA toolkit here")
    env = dict(os.environ, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS=str(os.cpu_count() or 2))
    out = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "C++ and CUDA ops" in out.stdout
    built = list((tmp_path / "lib").rglob("_C*.so"))
    assert built, "no extension module was produced"
    # the CUDA kernels are in it
    symbols = subprocess.run(["nm", "-C", str(built[0])], capture_output=True, text=True).stdout
    assert "launch_augment_mix" in symbols and "launch_soft_label_loss" in symbols

"""The CUDA kernels (csrc/ops/cuda/*.cu) executed on the CPU through the project's SIMT emulation (csrc/emu/).

The unchanged .cu sources are compiled with g++ against csrc/emu/cuda_runtime.h (only their `<<<...>>>` launch
lines are rewritten), linked with csrc/emu/kernel_driver.cpp, and run on inputs written here; the outputs are
compared with the PyTorch references in hello_fast.ops. Every case also runs under AddressSanitizer +
UndefinedBehaviorSanitizer, and (slow tier) under ThreadSanitizer with the block's threads running concurrently.
Mutated copies of the sources (a removed __syncthreads, an off-by-one bound, a wrong shuffle width, lanes leaving
before a full-mask shuffle) must make a case fail. Builds are cached by source hash under the temp directory.
Seeds: HELLO_FAST_EMU_SEED fixes them (each failure message names its case's seed).
"""
from __future__ import annotations

import functools
import hashlib
import os
import random
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from hello_fast.ops import sample_augment_params
from hello_fast.ops.augment_mix import DTYPE_CODES, augment_mix_reference
from hello_fast.ops.soft_label_loss import soft_label_loss_reference

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "csrc" / "emu"
CUDA = ROOT / "csrc" / "ops" / "cuda"
KERNELS = ("augment_mix_kernel.cu", "soft_label_loss_kernel.cu")
HEADERS = [EMU / "cuda_runtime.h", EMU / "cuda_fp16.h", EMU / "cuda_bf16.h", EMU / "selftest.h", CUDA / "launch.h",
           ROOT / "csrc" / "ops" / "limits.h"]
CXX = os.environ.get("CXX", "g++")
FLAVOURS = {
    "plain": ["-O2"],
    "asan": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "tsan": ["-O1", "-g", "-fsanitize=thread"],
}
SEED = int(os.environ.get("HELLO_FAST_EMU_SEED", random.SystemRandom().randrange(2**31)))
MIX_CODES = {"none": 0, "mixup": 1, "cutmix": 2}
SIZES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
SLL_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no C++ compiler ({CXX}) to build the emulation")


# ---------------------------------------------------------------------------------------------------------------
# building


_LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(?P<config>[^;]*?)>>>\s*\((?P<args>[^;]*)\)\s*;")

_SHARED = re.compile(r"\b__shared__\s[^;{}()]*?\b(?P<name>[A-Za-z_]\w*)\s*(?:\[[^\];]*\]\s*)*;")


def emulated_source(text: str, path: str) -> str:
    """The .cu text with each `k<<<cfg>>>(args);` rewritten to an emulator launch, and each `__shared__` declaration
    followed by its registration with the emulator (which poisons it at every block start), line numbers kept."""
    def launch(m):
        args = m["args"].strip()
        return f'::emu::launch(::emu::Config({m["config"]}).named("{m["kernel"]}"), {m["kernel"]}{", " + args if args else ""});'

    out, n = _LAUNCH.subn(launch, text)
    if n == 0:
        raise ValueError(f"{path}: no <<<...>>> launch found")
    out = _SHARED.sub(lambda m: f'{m[0]} ::emu::shared_declared(&{m["name"]}, sizeof({m["name"]}));', out)
    return f'#line 1 "{path}"\n' + out


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _cache_dir() -> Path:
    d = Path(os.environ.get("HELLO_FAST_EMU_CACHE", Path(tempfile.gettempdir()) / "hello_fast_cuda_emu"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _compile(src_text: str, name: str, flags: list[str], headers_key: str) -> Path:
    obj = _cache_dir() / f"{name}-{_digest(src_text, flags, headers_key, CXX)}.o"
    if obj.exists():
        return obj
    work = Path(tempfile.mkdtemp(dir=_cache_dir()))
    src = work / (name + ".cpp")
    src.write_text(src_text)
    cmd = [CXX, "-std=c++20", "-pthread", "-Wall", "-Wextra", f"-I{EMU}", f"-I{CUDA}", *flags, "-c", str(src),
           "-o", str(work / "x.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"compiling {name} for the emulation failed:\n{res.stderr[-4000:]}")
    os.replace(work / "x.o", obj)  # atomic: concurrent test runs share the cache
    shutil.rmtree(work, ignore_errors=True)
    return obj


def build(flavour: str = "plain", sources: dict[str, str] | None = None) -> Path:
    """The kernel driver built with `flavour`'s flags; `sources` replaces kernel .cu texts (mutations)."""
    flags = FLAVOURS[flavour]
    headers_key = _digest(*(h.read_bytes() for h in HEADERS))
    units = []
    for k in KERNELS:
        text = (sources or {}).get(k, (CUDA / k).read_text())
        units.append((emulated_source(text, f"csrc/ops/cuda/{k}"), Path(k).stem))
    units.append((emulated_source((EMU / "selftest.cu").read_text(), "csrc/emu/selftest.cu"), "selftest"))
    units.append(((EMU / "kernel_driver.cpp").read_text(), "kernel_driver"))
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        objects = list(pool.map(lambda u: _compile(u[0], u[1], flags, headers_key), units))
    exe = _cache_dir() / f"driver-{flavour}-{_digest(*(o.name for o in objects))}"
    if not exe.exists():
        tmp = exe.with_suffix(f".{os.getpid()}.tmp")
        res = subprocess.run([CXX, "-pthread", *flags, *map(str, objects), "-o", str(tmp)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"linking the emulated kernels failed:\n{res.stderr[-4000:]}")
        os.replace(tmp, exe)
    return exe


_BUILDS: dict[str, Path] = {}


@functools.lru_cache(maxsize=None)
def _flags_work(flavour: str) -> bool:
    """Whether this compiler links a program with `flavour`'s flags (a sanitizer's runtime may be missing)."""
    probe = _cache_dir() / f"probe-{flavour}-{_digest(FLAVOURS[flavour], CXX)}"
    if not probe.exists():
        res = subprocess.run([CXX, "-x", "c++", "-pthread", *FLAVOURS[flavour], "-", "-o", str(probe)],
                             input="int main() { return 0; }\n", capture_output=True, text=True)
        if res.returncode != 0:
            return False
    return subprocess.run([str(probe)], capture_output=True).returncode == 0


def driver(flavour: str) -> Path:
    """The kernel driver for `flavour`, built once per session (skips where its sanitizer is not installed)."""
    if not _flags_work(flavour):
        pytest.skip(f"{CXX} cannot build and run with {' '.join(FLAVOURS[flavour])} here")
    if flavour not in _BUILDS:
        _BUILDS[flavour] = build(flavour)
    return _BUILDS[flavour]


class EmulatorFailure(AssertionError):
    """The emulated kernel aborted: an emulator check, a sanitizer report or the watchdog."""


def _run(exe: Path, args: list[str], *, schedule="forward", timeout=300, watchdog_s=30, shared=None):
    """Run the driver; `shared`: how blocks start their shared memory, "poison" (default) or "zero"."""
    shared = shared or os.environ.get("HELLO_FAST_EMU_SHARED", "poison")
    env = dict(os.environ, HELLO_FAST_EMU_SCHEDULE=schedule, HELLO_FAST_EMU_WATCHDOG_S=str(watchdog_s),
               HELLO_FAST_EMU_SHARED=shared,
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1",
               TSAN_OPTIONS="halt_on_error=1:exitcode=66")
    res = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise EmulatorFailure(f"{exe.name} {' '.join(args)} exited with {res.returncode}:\n{res.stderr[-6000:]}")
    return res


def _write(d: Path, name: str, t: torch.Tensor):
    t.detach().contiguous().cpu().view(torch.uint8).numpy().tofile(d / f"{name}.bin")


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a dense tensor in its own memory order (any strides, no offset)."""
    assert t.storage_offset() == 0
    return torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,)).view(torch.uint8)


def _read(d: Path, name: str, dtype, shape, strides) -> torch.Tensor:
    raw = torch.from_numpy(np.fromfile(d / f"{name}.bin", dtype=np.uint8).copy()).view(dtype)
    return torch.as_strided(raw, shape, strides)


def emulated_augment_mix(exe, work: Path, src, index, crop, flip, partner, lam, cut, *, mode, out_size, views,
                         shuffle=None, channels_last=False, schedule="forward"):
    """The CUDA augment_mix kernel on the emulator, filled in as csrc/ops/cuda/augment_mix_cuda.cpp does."""
    work.mkdir(parents=True, exist_ok=True)
    B = index.shape[0]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    outs = [torch.empty((B, 3, out_size, out_size), dtype=d, memory_format=fmt) for _, _, d in views]
    lines = [f"batch {B}", f"views {len(views)}", f"out_size {out_size}", f"mode {MIX_CODES[mode]}",
             f"src_numel {src.numel()}", "src_stride " + " ".join(map(str, src.stride())),
             "src_shape " + " ".join(map(str, src.shape))]
    if shuffle is not None:
        lines.append(f"shuffle_factor {shuffle.shape[2]}")
        _write(work, "shuffle", shuffle)
    for k, ((mean, std, dtype), o) in enumerate(zip(views, outs)):
        inv = [float(np.float32(1.0 / s)) for s in std]
        lines.append(f"view{k} {DTYPE_CODES[dtype]} {o.numel()} " + " ".join(map(str, o.stride())) + " "
                     + " ".join(repr(float(m)) for m in mean) + " " + " ".join(repr(v) for v in inv))
    (work / "args.txt").write_text("\n".join(lines) + "\n")
    _storage_bytes(src).numpy().tofile(work / "src.bin")
    for name, t in (("index", index), ("crop", crop), ("flip", flip.to(torch.uint8)), ("partner", partner),
                    ("lam", lam), ("cut", cut)):
        _write(work, name, t)
    _run(exe, ["augment_mix", str(work)], schedule=schedule)
    assert (work / "status.txt").read_text().strip() == "0", "launch failed: " + (work / "status.txt").read_text()
    return tuple(_read(work, f"out_view{k}", o.dtype, o.shape, o.stride()) for k, o in enumerate(outs))


def emulated_soft_label_loss(exe, work: Path, student, target, hard, partner, lam, *, mode, temperature, beta,
                             with_grad=True, schedule="forward"):
    """(loss, grad) of the CUDA soft_label_loss kernel on the emulator, finished as soft_label_loss_cuda.cpp does."""
    work.mkdir(parents=True, exist_ok=True)
    B, C = student.shape
    target = None if target is None else target.to(student.dtype)
    lines = [f"batch {B}", f"classes {C}", f"dtype {SLL_DTYPES[student.dtype]}", f"s_row {student.stride(0)}",
             f"t_row {0 if target is None else target.stride(0)}", f"has_target {int(target is not None)}",
             f"kl {int(mode == 'kl')}", f"inv_t {repr(float(np.float32(1.0 / temperature)))}", f"beta {repr(float(beta))}",
             f"with_grad {int(with_grad)}", f"student_numel {student.untyped_storage().nbytes() // student.element_size()}"]
    if target is not None:
        lines.append(f"target_numel {target.untyped_storage().nbytes() // target.element_size()}")
        _storage_bytes(target).numpy().tofile(work / "target.bin")
    (work / "args.txt").write_text("\n".join(lines) + "\n")
    _storage_bytes(student).numpy().tofile(work / "student.bin")
    for name, t in (("hard", hard), ("partner", partner), ("lam", lam)):
        _write(work, name, t)
    _run(exe, ["soft_label_loss", str(work)], schedule=schedule)
    assert (work / "status.txt").read_text().strip() == "0", "launch failed: " + (work / "status.txt").read_text()
    rows = _read(work, "out_rows", torch.float32, (B, 2), (2, 1))
    main_div = B * C if mode == "mse" else B
    loss = rows[:, 0].sum() / main_div + rows[:, 1].sum() * (beta / B)
    grad = _read(work, "out_grad", student.dtype, (B, C), (C, 1)) if with_grad else None
    return loss, grad, rows


# ---------------------------------------------------------------------------------------------------------------
# the cases


VIEW_F32 = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), torch.float32)
VIEW_BF16 = ((0.48, 0.46, 0.41), (0.27, 0.26, 0.28), torch.bfloat16)
VIEW_F16 = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.float16)
VIEW_RAW = ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), torch.float32)  # pixels 0-255
VIEW_TOL = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 4e-2}

# (B, S, H, W, out, mode, views, channels_last, src_channels_last, shuffle_factor): every mode at batch 1, odd and tiny
# sizes and 224 px, 1-4 views of every dtype, both view layouts and both source layouts; then RDED's ShufflePatches
# (factor 0: none) in every mode with factors 1-4, sides that the factor does not divide among them
_VIEW_SETS = [[VIEW_F32], [VIEW_F32, VIEW_BF16], [VIEW_F16, VIEW_F32, VIEW_BF16], [VIEW_F32, VIEW_BF16, VIEW_F16, VIEW_RAW]]
_AUGMENT_SHAPES = [(1, 2, 9, 7, 1), (3, 4, 29, 38, 17), (2, 3, 40, 31, 45), (5, 5, 33, 33, 19), (1, 3, 250, 230, 224)]
_SHUFFLE_SHAPES = [(3, 4, 29, 38, 17, 2), (2, 3, 40, 31, 45, 3), (5, 5, 33, 33, 19, 4), (2, 3, 224, 224, 224, 2),
                   (1, 2, 9, 7, 5, 1)]
AUGMENT_CASES = [
    (*shape, mode, _VIEW_SETS[(i + j) % 4], (i + j) % 2 == 1, (i * 5 + j) % 3 == 2, 0)
    for i, mode in enumerate(("none", "mixup", "cutmix")) for j, shape in enumerate(_AUGMENT_SHAPES)
] + [
    (*shape[:5], mode, _VIEW_SETS[(i + j) % 4], (i + j) % 2 == 0, (i + j) % 3 == 1, shape[5])
    for i, mode in enumerate(("none", "mixup", "cutmix")) for j, shape in enumerate(_SHUFFLE_SHAPES) if (i + j) % 3 != 2
]


def _augment_inputs(case, seed):
    B, S, H, W, out, mode, views, channels_last, src_cl, factor = case
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 256, (S, 3, H, W), dtype=torch.uint8, generator=g)
    if src_cl:
        src = src.contiguous(memory_format=torch.channels_last)
    index = torch.randint(0, S, (B,), generator=g)
    p = sample_augment_params(index, H, W, out_size=out, scale=(0.02, 1.0), mode=mode, per_sample=True, generator=g,
                              shuffle_factor=max(factor, 1))
    if mode == "mixup":
        p["lam"] = torch.rand(B, generator=g)
    if factor == 1:  # an explicit identity order: the kernel's shuffled path with one strip
        p["shuffle"] = torch.zeros(B, 2, 1, dtype=torch.long)
    return src, index, p


def _check_views(got, want, views, where):
    for k, (g_, w_, (_, _, dtype)) in enumerate(zip(got, want, views)):
        assert g_.dtype == dtype and g_.shape == w_.shape, where
        assert torch.isfinite(g_.float()).all(), f"{where}: view {k} has unwritten (NaN) elements"
        err = (g_.float() - w_.float()).abs().max().item()
        assert err <= VIEW_TOL[dtype], f"{where}: view {k} ({dtype}) differs from the reference by {err}"


def _augment_case_matches(exe, tmp_path, case, seed, schedule="forward"):
    src, index, p = _augment_inputs(case, seed)
    mode, out, views, cl = case[5], case[4], case[6], case[7]
    want, _ = augment_mix_reference(src, index, **p, mode=mode, out_size=out, views=views)
    got = emulated_augment_mix(exe, tmp_path, src, index, **p, mode=mode, out_size=out, views=views, channels_last=cl,
                               schedule=schedule)
    _check_views(got, want, views, f"augment_mix case {case[:6]} seed {seed}")


def _edge_params():
    """Border and one-pixel crops, partners that are the sample itself, empty and full CutMix boxes."""
    index = torch.tensor([0, 3, 2, 1, 0, 3, 2])
    crop = torch.tensor([[0, 0, 21, 30], [20, 29, 1, 1], [0, 29, 21, 1], [20, 0, 1, 30], [0, 0, 1, 1], [5, 7, 16, 23],
                         [0, 0, 7, 30]])
    flip = torch.tensor([True, False, True, True, False, False, True])
    partner = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    cut = torch.tensor([[0, 0, 17, 17], [3, 4, 9, 10], [0, 0, 0, 0], [16, 16, 17, 17], [2, 2, 15, 3], [0, 5, 17, 6],
                        [1, 1, 2, 2]])
    return index, dict(crop=crop, flip=flip, partner=partner, cut=cut)


# (B, C, dtype, mode, temperature, beta, with_target, row_padding): every dtype x loss configuration on two shapes
# of a list that cycles through batch 1, one class, odd class counts, 1000 and 21843 classes, and padded rows
_LOSS_CONFIGS = [("mse", 1.0, 0.0, True), ("mse", 1.0, 0.7, True), ("kl", 4.0, 0.0, True), ("kl", 1.0, 0.3, True),
                 ("kl", 20.0, 0.1, True), ("mse", 1.0, 1.0, False)]
_LOSS_SHAPES = [(1, 1, 0), (3, 1000, 5), (1, 7, 0), (2, 1001, 3), (5, 257, 0), (2, 2049, 0), (3, 1000, 0), (1, 21843, 1),
                (4, 31, 0)]
LOSS_CASES = [
    (B, C, dtype, *config, pad)
    for i, (dtype, config) in enumerate((d, c) for d in (torch.float32, torch.bfloat16, torch.float16) for c in _LOSS_CONFIGS)
    for B, C, pad in (_LOSS_SHAPES[(2 * i) % 9], _LOSS_SHAPES[(2 * i + 1) % 9])
]
LOSS_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-4, 1e-2)}  # loss, grad


def _loss_inputs(case, seed):
    B, C, dtype, _, _, _, with_target, pad = case
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, C + pad, generator=g) * 3).to(dtype)[:, :C]  # rows `pad` elements apart
    t = (torch.randn(B, C, generator=g) * 3).to(dtype) if with_target else None
    hard = torch.randint(0, C, (B,), generator=g)
    partner = torch.randperm(B, generator=g)
    lam = torch.rand(B, generator=g)
    return s, t, hard, partner, lam


def _loss_case_matches(exe, tmp_path, case, seed, schedule="forward"):
    _, _, dtype, mode, T, beta, _, _ = case
    s, t, hard, partner, lam = _loss_inputs(case, seed)
    loss, grad, _ = emulated_soft_label_loss(exe, tmp_path, s, t, hard, partner, lam, mode=mode, temperature=T,
                                             beta=beta, schedule=schedule)
    s64 = s.double().requires_grad_(True)
    want = soft_label_loss_reference(s64, None if t is None else t.double(), hard, partner, lam, mode=mode,
                                     temperature=T, beta=beta)
    (g64,) = torch.autograd.grad(want, s64)
    where = f"soft_label_loss case {case} seed {seed}"
    tol_loss, tol_grad = LOSS_TOL[dtype]
    assert torch.isfinite(grad.float()).all(), f"{where}: gradient has unwritten (NaN) elements"
    assert abs(loss.item() - want.item()) <= tol_loss * max(1.0, abs(want.item())), f"{where}: loss {loss.item()} vs {want.item()}"
    err = (grad.double() - g64).abs().max().item()
    assert err <= tol_grad * max(1e-3, g64.abs().max().item()), f"{where}: gradient differs by {err}"


def _case_id(case):
    shuffle = [f"shuffle{case[-1]}"] if len(case) == 10 and case[-1] else []
    return "-".join([str(x).replace("torch.", "") for x in case[:6]] + shuffle)


# ---------------------------------------------------------------------------------------------------------------
# the emulator itself


def test_launch_rewrite_keeps_lines_and_arguments():
    text = "a;\nk<T><<<grid, 256, 0, s>>>(x, f(y));\nq<<<1, 32>>>();\n"
    out = emulated_source(text, "x.cu")
    assert out.splitlines()[1:] == [
        "a;", '::emu::launch(::emu::Config(grid, 256, 0, s).named("k<T>"), k<T>, x, f(y));',
        '::emu::launch(::emu::Config(1, 32).named("q"), q);']
    for k in KERNELS:
        assert "<<<" not in emulated_source((CUDA / k).read_text(), k)
    shared = "q<<<1, 32>>>();\n  __shared__ float part[kThreads / 32];\n__shared__ volatile int flag;\n"
    assert emulated_source(shared, "x.cu").splitlines()[2:] == [
        "  __shared__ float part[kThreads / 32]; ::emu::shared_declared(&part, sizeof(part));",
        "__shared__ volatile int flag; ::emu::shared_declared(&flag, sizeof(flag));"]
    # every __shared__ declaration of the kernels is registered (so it starts each block poisoned)
    declared = 0
    for path in [*(CUDA / k for k in KERNELS), EMU / "selftest.cu"]:
        text = path.read_text()
        assert emulated_source(text, path.name).count("::emu::shared_declared(") == text.count("__shared__"), path
        declared += text.count("__shared__")
    assert declared >= 4


def _selftest(name, tmp_path, flavour="plain", **kw):
    return _run(driver(flavour), ["selftest", name, str(tmp_path)], **kw)


@pytest.mark.parametrize("schedule", ["forward", "reverse", "free"])
def test_shuffles_follow_the_cuda_rules(schedule, tmp_path):
    _selftest("shuffles", tmp_path, schedule=schedule)
    out = np.fromfile(tmp_path / "out.bin", dtype=np.int32).reshape(12, 64)
    t = np.arange(64)
    lane, base = t % 32, t - t % 32
    v = lambda src: 100 * src + 7  # noqa: E731

    def xor(m, w):
        src = lane ^ m
        return v(np.where(src >= (lane & ~(w - 1)) + w, lane, src) + base)

    def down(d, w):
        return v(np.where((lane & (w - 1)) + d < w, lane + d, lane) + base)

    def up(d, w):
        return v(np.where((lane & (w - 1)) >= d, lane - d, lane) + base)

    want = [xor(1, 32), xor(16, 32), xor(16, 16), xor(5, 8), down(1, 32), down(5, 8), up(3, 32), up(3, 8),
            v(base + 7), v(base + (lane & ~15) + 37 % 16), np.full(64, int((sum(range(32)) + 8) * 4)),
            np.where(lane + 2 < 32, t + 2, t)]
    for k, w in enumerate(want):
        assert np.array_equal(out[k], w), f"shuffle case {k}: {out[k]} != {w}"


@pytest.mark.parametrize("schedule", ["forward", "reverse", "free"])
def test_exited_threads_drop_out_of_barriers(schedule, tmp_path):
    _selftest("exited_drop_out", tmp_path, schedule=schedule)
    out = np.fromfile(tmp_path / "out.bin", dtype=np.int32)
    assert np.array_equal(out, 3 * (99 - np.arange(100)))


@pytest.mark.parametrize("name, words", [
    ("exited_lane_shuffle", "exited"),
    ("divergent_barrier", "different __syncthreads"),
    ("deadlock", "deadlock: no thread can run"),
])
def test_misuse_is_reported(name, words, tmp_path):
    with pytest.raises(EmulatorFailure, match=words):
        _selftest(name, tmp_path)


def test_watchdog_stops_a_spinning_thread_and_a_free_running_deadlock(tmp_path):
    with pytest.raises(EmulatorFailure, match="watchdog: no thread reached"):
        _selftest("spin", tmp_path, watchdog_s=1)
    with pytest.raises(EmulatorFailure, match=r"watchdog.*threads 0-0 at __syncthreads; threads 1-31 at a shuffle"):
        _selftest("deadlock", tmp_path, schedule="free", watchdog_s=1)


@pytest.mark.parametrize("schedule", ["forward", "free"])
def test_every_block_starts_with_poisoned_shared_memory(schedule, tmp_path):
    """Shared words read before any write are 0xffffffff (NaN as a float) in every block, not zero and not what the
    previous block left; HELLO_FAST_EMU_SHARED=zero gives the zeroed start that hides such reads."""
    _selftest("shared_starts_poisoned", tmp_path, schedule=schedule)
    out = np.fromfile(tmp_path / "out.bin", dtype=np.int32).reshape(2, 128)
    for b in range(2):
        assert (out[b, :64] == -1).all(), out[b, :64]
        assert (out[b, 64:72] == 1).all(), out[b, 64:72]
    _selftest("shared_starts_poisoned", tmp_path, schedule=schedule, shared="zero")
    out = np.fromfile(tmp_path / "out.bin", dtype=np.int32).reshape(2, 128)
    assert (out[:, :64] == 0).all() and (out[:, 64:72] == 0).all()


def test_launch_bounds_are_cuda_s(tmp_path):
    _selftest("launch_bounds", tmp_path)
    codes = np.fromfile(tmp_path / "out.bin", dtype=np.int32).tolist()
    invalid_config, invalid_value = 9, 1
    # blocks 1025, 32x32x2, z=65, 0 | 1024, 4x4x64; grids y=65536, z=65536, x=0 | 3x2x2; 48 KiB + 4 B of smem
    assert codes[:-1] == [invalid_config] * 4 + [0, 0] + [invalid_config] * 3 + [0, invalid_value]
    assert codes[-1] == 1 + 1 + 12  # blocks that ran: only the valid launches


def test_half_and_bfloat16_conversions_round_as_torch(tmp_path):
    g = torch.Generator().manual_seed(SEED)
    x = torch.cat([torch.randn(20000, generator=g) * torch.exp2(torch.randint(-30, 20, (20000,), generator=g).float()),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, float("inf"), 2.0**-24, 2.0**-25,
                                 3 * 2.0**-26, 2.0**-14, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 3.3895314e38]),
                   torch.arange(-70000, 70000, 7, dtype=torch.float32) / 3])
    x.numpy().tofile(tmp_path / "x.bin")
    _selftest("half", tmp_path)
    half = torch.from_numpy(np.fromfile(tmp_path / "half.bin", dtype=np.int16))
    bf16 = torch.from_numpy(np.fromfile(tmp_path / "bf16.bin", dtype=np.int16))
    assert torch.equal(half, x.half().view(torch.int16)), f"seed {SEED}"
    assert torch.equal(bf16, x.bfloat16().view(torch.int16)), f"seed {SEED}"
    back = torch.from_numpy(np.fromfile(tmp_path / "half_to_float.bin", dtype=np.float32))
    want = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    want = torch.cat([want[32768:], want[:32768]])  # bit patterns 0..65535
    assert torch.equal(back.isnan(), want.isnan()) and torch.equal(back[~back.isnan()], want[~want.isnan()])


# ---------------------------------------------------------------------------------------------------------------
# the kernels against the references


@pytest.mark.parametrize("flavour", ["plain", "asan"])
@pytest.mark.parametrize("case", AUGMENT_CASES, ids=_case_id)
def test_augment_mix_kernel_matches_reference(case, flavour, tmp_path):
    _augment_case_matches(driver(flavour), tmp_path, case, SEED)


@pytest.mark.parametrize("flavour", ["plain", "asan"])
def test_augment_mix_kernel_edge_parameters(flavour, tmp_path):
    g = torch.Generator().manual_seed(SEED)
    src = torch.randint(0, 256, (4, 3, 21, 30), dtype=torch.uint8, generator=g)
    index, p = _edge_params()
    lam = torch.rand(7, generator=g)
    for mode in ("none", "mixup", "cutmix"):
        views = [VIEW_F32, VIEW_BF16]
        want, _ = augment_mix_reference(src, index, **p, lam=lam, mode=mode, out_size=17, views=views)
        got = emulated_augment_mix(driver(flavour), tmp_path / mode, src, index, **p, lam=lam, mode=mode, out_size=17,
                                   views=views)
        _check_views(got, want, views, f"edge parameters, {mode}, seed {SEED}")


@pytest.mark.parametrize("flavour", ["plain", "asan"])
def test_augment_mix_kernel_poisons_out_of_range_samples_instead_of_reading(flavour, tmp_path):
    """Reachable only with check=False or from C++: the sample's views are NaN, the others are right, and the
    sanitizer sees no read outside the inputs."""
    g = torch.Generator().manual_seed(SEED)
    src = torch.randint(0, 256, (4, 3, 21, 30), dtype=torch.uint8, generator=g)
    index, p = _edge_params()
    lam = torch.rand(7, generator=g)
    bad_index, bad = index.clone(), {k: v.clone() for k, v in p.items()}
    bad_index[1] = 4                        # no such image
    bad["crop"][3] = torch.tensor([20, 0, 2, 30])   # one row below the image
    bad["partner"][5] = 7                   # no such batch row
    bad["cut"][6] = torch.tensor([1, 1, 18, 2])     # below the 17x17 output
    want, _ = augment_mix_reference(src, index, **p, lam=lam, mode="cutmix", out_size=17, views=[VIEW_F32])
    (got,) = emulated_augment_mix(driver(flavour), tmp_path, src, bad_index, **bad, lam=lam, mode="cutmix", out_size=17,
                                  views=[VIEW_F32])
    poisoned = [1, 3, 5, 6]
    assert got[poisoned].isnan().all()
    ok = [b for b in range(7) if b not in poisoned]
    assert (got[ok] - want[0][ok]).abs().max() <= VIEW_TOL[torch.float32]


@pytest.mark.parametrize("flavour", ["plain", "asan"])
def test_augment_mix_kernel_poisons_samples_whose_strip_orders_are_not_permutations(flavour, tmp_path):
    """ShufflePatches orders out of range or with a repeated strip (check=False or C++ only) poison their sample: the
    kernel never reads through them; the other samples are the reference's."""
    g = torch.Generator().manual_seed(SEED)
    src = torch.randint(0, 256, (4, 3, 21, 30), dtype=torch.uint8, generator=g)
    index, p = _edge_params()
    lam = torch.rand(7, generator=g)
    shuffle = torch.rand(7, 2, 3, generator=g).argsort(-1)
    bad = shuffle.clone()
    bad[2, 0] = torch.tensor([0, 0, 1])   # strip 0 twice, strip 2 never
    bad[4, 1] = torch.tensor([0, 3, 1])   # no strip 3 of 3
    want, _ = augment_mix_reference(src, index, **p, lam=lam, mode="cutmix", out_size=17, views=[VIEW_F32], shuffle=shuffle)
    (got,) = emulated_augment_mix(driver(flavour), tmp_path, src, index, **p, lam=lam, mode="cutmix", out_size=17,
                                  views=[VIEW_F32], shuffle=bad)
    assert got[[2, 4]].isnan().all(), f"seed {SEED}"
    ok = [0, 1, 3, 5, 6]
    assert (got[ok] - want[0][ok]).abs().max() <= VIEW_TOL[torch.float32], f"seed {SEED}"


@pytest.mark.parametrize("flavour", ["plain", "asan"])
@pytest.mark.parametrize("case", LOSS_CASES, ids=_case_id)
def test_soft_label_loss_kernel_matches_reference(case, flavour, tmp_path):
    _loss_case_matches(driver(flavour), tmp_path, case, SEED)


@pytest.mark.parametrize("flavour", ["plain", "asan"])
def test_soft_label_loss_forward_only_and_reverse_schedule(flavour, tmp_path):
    case = (3, 1000, torch.float32, "kl", 4.0, 0.2, True, 0)
    s, t, hard, partner, lam = _loss_inputs(case, SEED)
    loss, grad, _ = emulated_soft_label_loss(driver(flavour), tmp_path / "f", s, t, hard, partner, lam, mode="kl",
                                             temperature=4.0, beta=0.2, with_grad=False)
    want = soft_label_loss_reference(s.double(), t.double(), hard, partner, lam, mode="kl", temperature=4.0, beta=0.2)
    assert grad is None and abs(loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    _loss_case_matches(driver(flavour), tmp_path / "r", case, SEED, schedule="reverse")


@pytest.mark.parametrize("flavour", ["plain", "asan"])
def test_soft_label_loss_kernel_poisons_out_of_range_labels_instead_of_reading(flavour, tmp_path):
    """The bug the emulator found: a hard label >= C read past the logits. Now the row is NaN, nothing is read."""
    g = torch.Generator().manual_seed(SEED)
    B, C = 4, 300
    s = torch.randn(B, C, generator=g)
    t = torch.randn(B, C, generator=g)
    hard = torch.tensor([1, C, 2, 3])           # row 1's own label is out of range
    partner = torch.tensor([1, 0, 9, 3])        # row 0 mixes with row 1; row 2's partner does not exist
    lam = torch.rand(B, generator=g)
    _, grad, rows = emulated_soft_label_loss(driver(flavour), tmp_path, s, t, hard, partner, lam, mode="mse",
                                             temperature=1.0, beta=0.5)
    assert rows[:3].isnan().all() and grad[:3].isnan().all()
    assert torch.isfinite(rows[3]).all() and torch.isfinite(grad[3]).all()


# ---------------------------------------------------------------------------------------------------------------
# ThreadSanitizer, with the threads of a block running concurrently


@pytest.mark.slow
def test_every_case_under_thread_sanitizer(tmp_path):
    exe = driver("tsan")
    for i, case in enumerate(AUGMENT_CASES):
        _augment_case_matches(exe, tmp_path / f"a{i}", case, SEED, schedule="free")
    for i, case in enumerate(LOSS_CASES):
        _loss_case_matches(exe, tmp_path / f"l{i}", case, SEED, schedule="free")


# ---------------------------------------------------------------------------------------------------------------
# the tests catch bugs: mutated copies of the sources must fail


def _mutated(kernel: str, old: str, new: str, count: int = 1) -> dict[str, str]:
    """A copy of `kernel`'s source with `old` replaced (the test fails loudly if the source no longer has it)."""
    text = (CUDA / kernel).read_text()
    assert text.count(old) >= count, f"{kernel} no longer contains {old!r}: update the mutation"
    return {kernel: text.replace(old, new, count)}


def _mutant(flavour: str, sources: dict[str, str]) -> Path:
    driver(flavour)  # skips where the flavour cannot build here
    return build(flavour, sources)


def _failures(exe, tmp_path, loss_cases=(), augment_cases=(), schedules=("forward",)):
    found = []
    for schedule in schedules:
        for i, case in enumerate(loss_cases):
            try:
                _loss_case_matches(exe, tmp_path / f"{schedule}-l{i}", case, SEED, schedule=schedule)
            except AssertionError as e:  # a mismatch, or EmulatorFailure (emulator check, sanitizer, watchdog)
                found.append(e)
        for i, case in enumerate(augment_cases):
            try:
                _augment_case_matches(exe, tmp_path / f"{schedule}-a{i}", case, SEED, schedule=schedule)
            except AssertionError as e:
                found.append(e)
    return found


BLOCK_SUM_WRITE = "  if (lane == 0) shared[warp] = v;\n  __syncthreads();\n  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : 0.f;"
MUTATION_CASES = [(3, 1000, torch.float32, "kl", 4.0, 0.3, True, 0), (2, 257, torch.bfloat16, "mse", 1.0, 0.5, True, 0)]


def test_a_removed_syncthreads_is_caught(tmp_path):
    src = _mutated("soft_label_loss_kernel.cu", BLOCK_SUM_WRITE, BLOCK_SUM_WRITE.replace("  __syncthreads();\n", ""))
    found = _failures(_mutant("plain", src), tmp_path, MUTATION_CASES)
    assert found and all("differs" in str(e) or "loss" in str(e) for e in found), found


def test_an_uninitialised_shared_memory_read_is_caught(tmp_path, monkeypatch):
    """A block sum whose warps skip storing a zero partial sum reads shared words nobody wrote. Zeroed shared memory
    hides it (the sum comes out right); the poisoned start of every block turns the read into NaN."""
    write = "  if (lane == 0) shared[warp] = v;\n"
    assert BLOCK_SUM_WRITE.startswith(write)
    src = _mutated("soft_label_loss_kernel.cu", BLOCK_SUM_WRITE,
                   BLOCK_SUM_WRITE.replace(write, "  if (lane == 0 && v != 0.f) shared[warp] = v;\n"))
    # 7 classes: only warp 0 of the 256 threads holds elements, the other warps' partial sums are 0
    cases = [(1, 7, torch.float32, "mse", 1.0, 0.0, True, 0), (2, 7, torch.float32, "mse", 1.0, 0.0, True, 0)]
    exe = _mutant("plain", src)
    found = _failures(exe, tmp_path / "poison", cases)
    assert len(found) == len(cases) and all("loss nan" in str(e) for e in found), found
    monkeypatch.setenv("HELLO_FAST_EMU_SHARED", "zero")
    assert not _failures(exe, tmp_path / "zero", cases)


def test_an_off_by_one_bound_is_caught_by_the_sanitizer(tmp_path):
    src = _mutated("augment_mix_kernel.cu", "if (pix >= n) return;", "if (pix > n) return;")
    found = _failures(_mutant("asan", src), tmp_path, augment_cases=AUGMENT_CASES[:3])
    assert any("AddressSanitizer" in str(e) for e in found), found
    src = _mutated("soft_label_loss_kernel.cu", "for (int64_t c = threadIdx.x; c < C; c += kThreads) {",
                   "for (int64_t c = threadIdx.x; c <= C; c += kThreads) {")
    found = _failures(_mutant("asan", src), tmp_path / "loss", [(1, 7, torch.float32, "kl", 1.0, 0.3, True, 0)])
    assert any("AddressSanitizer" in str(e) for e in found), found


def test_a_remainder_given_to_the_wrong_strip_is_caught(tmp_path):
    """ShufflePatches cases whose sides the factor does not divide tell which strip takes the remainder."""
    src = _mutated("augment_mix_kernel.cu", "order[k] == factor - 1 ? rem : 0", "order[k] == 0 ? rem : 0")
    uneven = [c for c in AUGMENT_CASES if c[-1] > 1 and (c[2] % c[-1] or c[3] % c[-1])]
    found = _failures(_mutant("plain", src), tmp_path, augment_cases=uneven[:3])
    assert found and all("differs" in str(e) for e in found), found


def test_a_wrong_shuffle_width_is_caught(tmp_path):
    src = _mutated("soft_label_loss_kernel.cu", "v += __shfl_xor_sync(0xffffffff, v, o);",
                   "v += __shfl_xor_sync(0xffffffff, v, o, 16);", count=2)
    found = _failures(_mutant("plain", src), tmp_path, MUTATION_CASES)
    assert len(found) == len(MUTATION_CASES), found


def test_lanes_leaving_a_full_mask_shuffle_are_caught(tmp_path):
    src = _mutated("soft_label_loss_kernel.cu", "  if (warp == 0) {\n    for (int o = 16; o > 0; o >>= 1) v += ",
                   "  if (threadIdx.x < kThreads / 32) {\n    for (int o = 16; o > 0; o >>= 1) v += ")
    found = _failures(_mutant("plain", src), tmp_path, MUTATION_CASES[:1])
    assert found and "cuda-emu: deadlock" in str(found[0]), found


@pytest.mark.slow
def test_a_removed_syncthreads_is_a_data_race_for_thread_sanitizer(tmp_path):
    src = _mutated("soft_label_loss_kernel.cu", BLOCK_SUM_WRITE, BLOCK_SUM_WRITE.replace("  __syncthreads();\n", ""))
    found = _failures(_mutant("tsan", src), tmp_path, MUTATION_CASES[:1], schedules=("free",))
    assert found and "ThreadSanitizer: data race" in str(found[0]), found

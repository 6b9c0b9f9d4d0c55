"""The Triton kernels compiled ahead of time for sm_80 and sm_90 (no GPU): no compile error, shared memory within the limit, no spills on a fast path, tensor cores in the 16-bit LoRA GEMMs.

The compile runs in worker processes through benchmarks/_triton_aot.py (the package's own
launchers, Triton's real binder and compiler, a stand-in driver). The default tier compiles
each kernel's default fast path on both architectures; the slow tier compiles the whole matrix
of benchmarks/gpu_static.py. The proof holds for the Triton releases it ran on
(_triton_aot.PROVEN_TRITON, pyproject.toml's gpu-static extra): with any other Triton installed,
or one whose private API moved, every test here fails with the reason rather than skipping; only
an install without Triton at all (it is a Linux-only dependency) skips.
"""
from __future__ import annotations

import ast
import concurrent.futures
import glob
import json
import multiprocessing
import os
import re
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import _triton_aot  # noqa: E402

PROBLEM = _triton_aot.toolchain_problem()
pytestmark = pytest.mark.skipif(_triton_aot.installed_triton() is None, reason="triton is not installed: nothing compiles")


@pytest.fixture(autouse=True)
def proven_toolchain():
    """Outside the proven toolchain every test fails with the reason (a skip would read as a pass in CI)."""
    if PROBLEM is not None:
        pytest.fail(f"no static GPU proof for this toolchain: {PROBLEM}")

ARCHS = (80, 90)
KERNELS = ("lora_linear._fused_kernel", "lora_linear._tn_kernel", "lora_linear._multi_kernel",
           "augment_mix._augment_mix_kernel", "soft_label_loss._soft_label_loss_kernel")


@pytest.fixture(scope="session")
def fast_rows():
    """Each kernel's default fast path, compiled once per session for sm_80 and sm_90."""
    return _triton_aot.compile_scenarios(_triton_aot.enumerate_scenarios(ARCHS, full=False), workers=2)


def _where(r):
    return f"{r['kernel']} sm_{r['arch']} [{r.get('scenario')}] {r.get('launch') or ''}"


def test_every_kernel_compiles_for_both_architectures(fast_rows):
    errors = [f"{_where(r)}: {r['error']}" for r in fast_rows if r.get("error")]
    assert not errors, "\n".join(errors)
    for arch in ARCHS:
        compiled = {r["kernel"] for r in fast_rows if r["arch"] == arch and r.get("registers")}
        assert set(KERNELS) <= compiled, f"sm_{arch}: not compiled: {set(KERNELS) - compiled}"


def test_shared_memory_within_the_limit(fast_rows):
    over = [f"{_where(r)}: {r['smem_bytes']} > {r['smem_limit']}" for r in fast_rows
            if r.get("smem_bytes") is not None and r["smem_bytes"] > r["smem_limit"]]
    assert not over, "\n".join(over)
    assert {r["smem_limit"] for r in fast_rows} == {_triton_aot.SMEM_LIMIT[a] for a in ARCHS}


def test_no_spills_on_the_fast_paths(fast_rows):
    fast = [r for r in fast_rows if r["fast_path"]]
    assert {r["kernel"] for r in fast} == set(KERNELS)
    spilling = [f"{_where(r)}: {r['spills']} STL/LDL, {r['registers']} registers" for r in fast if r["spills"]]
    assert not spilling, "\n".join(spilling)
    # every mode of augment_mix and soft_label_loss is a fast path
    modes = {r["scenario"].split()[0] for r in fast if r["kernel"].startswith(("augment_mix", "soft_label_loss"))}
    assert {"mode=none", "mode=mixup", "mode=cutmix", "mode=mse", "mode=kl", "mode=ce"} <= modes


def test_sixteen_bit_and_tf32_lora_gemms_use_tensor_cores(fast_rows):
    gemms = [r for r in fast_rows if r["kernel"] in ("lora_linear._fused_kernel", "lora_linear._multi_kernel")]
    assert {r["dtype"] for r in gemms} >= {"bfloat16", "float32"}
    missing = [_where(r) for r in gemms if not r["tensor_core_instructions"]]
    assert not missing, "no mma.sync / wgmma in:\n" + "\n".join(missing)
    # sm_90 GEMM tiles of 64+ rows use the warpgroup MMA; the PTX count covers both forms
    assert all(r["vector_loads"] > 0 for r in gemms), "the GEMM operand loads are not vectorised"


def test_rows_carry_a_roofline_at_a_stated_problem_size(fast_rows):
    for r in fast_rows:
        assert set(r["roofline_us"]) == {"H100", "H200"} and r["problem"] and r["compulsory_bytes"] > 0
        assert 0 < r["roofline_us"]["H200"] <= r["roofline_us"]["H100"], _where(r)


def _compile_wide_augment(arch: int, BLOCK: int) -> dict:
    """augment_mix launched with BLOCK pixels over 4 warps, Mixup + ShufflePatches into 4 channels-last views."""
    from hello_fast.kernels import augment_mix as kern

    B, size = 8, 224
    src = torch.empty(4, 3, 256, 256, dtype=torch.uint8)
    outs = [torch.empty((B, 3, size, size), dtype=torch.bfloat16, memory_format=torch.channels_last) for _ in range(4)]
    maps = torch.zeros(B, 256, dtype=torch.int32)  # ShufflePatches strip maps
    with _triton_aot._Capture(arch, (kern,), "probe", 132) as cap:
        kern._augment_mix_kernel[(B, 49)](
            src, torch.zeros(B, dtype=torch.long), torch.zeros(B, 4, dtype=torch.long), torch.zeros(B, dtype=torch.uint8),
            torch.arange(B), torch.ones(B), torch.zeros(B, 4, dtype=torch.long), torch.empty(4, 6), maps, maps, *outs,
            size, *src.stride(), 256, 256, *[s for o in outs for s in o.stride()],
            MODE=kern.MODE_CODES["mixup"], NUM_VIEWS=4, SHUFFLE=True, BLOCK=BLOCK, num_warps=4)
    k = cap.launches[0]["compiled"]
    assert k is not None, cap.launches[0]["error"]
    return _triton_aot._resources(k.asm["cubin"], k.asm["ptx"])


def test_the_report_sees_spills_where_they_are():
    """The check has teeth: 4 pixels per thread (1,024 over 4 warps, the launch shape before the fix) spill on
    sm_90 and the report counts them; the shipped 2 per thread (256 over 4 warps) do not."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx, initializer=_triton_aot._init_worker) as pool:
        wide, shipped = pool.submit(_compile_wide_augment, 90, 1024).result(), pool.submit(_compile_wide_augment, 90, 256).result()
    assert wide["registers"] >= 250 and wide["spills"] > 0 and wide["stack_bytes"] > 0, wide
    assert shipped["spills"] == 0 and shipped["stack_bytes"] == 0 and shipped["registers"] < 128, shipped


def test_violations_name_each_broken_line():
    base = {"kernel": "lora_linear._fused_kernel", "arch": 90, "scenario": "s", "dtype": "bfloat16", "fast_path": True,
            "error": None, "registers": 128, "spills": 0, "smem_bytes": 1000, "smem_limit": 232_448,
            "tensor_core_instructions": 8}
    assert _triton_aot.violations([base]) == []
    broken = [dict(base, smem_bytes=307_200), dict(base, spills=12), dict(base, tensor_core_instructions=0),
              dict(base, error="CompilationError: x"), dict(base, spills=12, fast_path=False)]
    found = _triton_aot.violations(broken)
    assert len(found) == 4 and "307200" in found[0] and "spill" in found[1] and "tensor-core" in found[2] and "CompilationError" in found[3]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_csrc_cuda_kernels_build_without_spills():
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "ops", "cuda", "*.cu")))
    rows = _triton_aot.nvcc_resource_usage(sources, arch=90)
    assert {r["source"] for r in rows} == {os.path.basename(s) for s in sources}
    for r in rows:
        assert r["error"] is None, r
        assert r["kernel"].startswith("cuda:") and r["registers"] > 0, r
        assert r["spills"] == 0 and r["spill_bytes"] == 0, r


@pytest.mark.slow
def test_full_matrix_for_sm80_and_sm90():
    """Every rule of every device table x dtype x precision, every augment_mix/soft_label_loss variant."""
    scenarios = _triton_aot.enumerate_scenarios(ARCHS, full=True)
    rows = _triton_aot.compile_scenarios(scenarios, workers=2)
    bad = _triton_aot.violations(rows)
    assert not bad, "\n".join(bad)
    # every GPU rule of the config table is compiled on the architectures it serves
    for key, rules in _triton_aot.lora_tables().items():
        for i in range(len(rules)):
            rule = f"{key}[{i}]"
            assert any(r.get("config", {}).get("rule") == rule for r in rows), f"{rule} was never compiled"
    ieee = [r for r in rows if r["kernel"] == "lora_linear._fused_kernel" and r["dtype"] == "float32" and r["precision"] == "ieee"]
    assert ieee and not any(r["fast_path"] for r in ieee)  # the op runs cuBLAS there
    views = {int(r["scenario"].split("views=")[1].split()[0]) for r in rows if r["kernel"].startswith("augment_mix")}
    classes = {int(r["scenario"].split("classes=")[1].split()[0]) for r in rows if r["kernel"].startswith("soft_label_loss")}
    assert views == {1, 2, 3, 4} and {10, 100, 1000, 21843} <= classes


def test_pyproject_pins_the_proven_triton():
    """The gpu-static extra admits exactly the releases of PROVEN_TRITON among the neighbouring ones."""
    from packaging.requirements import Requirement

    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    match = re.search(r"^gpu-static = \[(.*)\]$", text, re.MULTILINE)
    assert match, "pyproject.toml has no gpu-static extra"
    (spec,) = [Requirement(r) for r in ast.literal_eval(f"[{match[1]}]")]  # a TOML array of strings reads as Python
    assert spec.name == "triton"
    candidates = {f"3.{minor}.{patch}" for minor in range(2, 12) for patch in range(3)} | set(_triton_aot.PROVEN_TRITON)
    assert {v for v in candidates if spec.specifier.contains(v)} == set(_triton_aot.PROVEN_TRITON), spec


def test_a_triton_outside_the_proven_range_is_a_failure_with_its_reason(monkeypatch):
    monkeypatch.setattr(_triton_aot, "installed_triton", lambda: "3.9.0")
    problem = _triton_aot.toolchain_problem()
    assert problem and "triton 3.9.0 is installed" in problem and "3.8.0" in problem and "gpu-static" in problem
    monkeypatch.setattr(_triton_aot, "installed_triton", lambda: _triton_aot.PROVEN_TRITON[0])
    monkeypatch.setattr(_triton_aot, "api_missing", lambda: "JITFunction.run takes no grid/warmup arguments")
    assert _triton_aot.toolchain_problem() == "JITFunction.run takes no grid/warmup arguments"


RESULT = os.path.join(ROOT, "benchmarks", "results", "gpu_static.json")


def _committed_rows() -> list[dict]:
    with open(RESULT) as f:
        return json.load(f)


def _reach_small(mutation=None):
    """The small grid of real calls through the dispatchers on sm_80 and sm_90, recorded (nothing compiles here),
    against the specialisations the committed report compiled: (uncovered, reached)."""
    from benchmarks import _reach

    rows = _committed_rows()
    reached, _ = _reach.coverage(ARCHS, full=False, known_rows=rows, compile_unknown=False, workers=2,
                                 mutation=mutation)
    return _reach.uncovered(reached, rows), reached


def test_every_specialisation_the_dispatchers_reach_was_compiled():
    """A launch path the dispatchers take without a compile in benchmarks/results/gpu_static.json fails here."""
    missing, reached = _reach_small()
    assert {arch for arch, _ in reached} == set(ARCHS) and len(reached) > 300, len(reached)
    assert not missing, ("reached by the dispatchers but never compiled (run benchmarks/gpu_static.py and commit "
                         "its results):\n" + "\n".join(f"{e['text']}\n  by {e['call']}" for e in missing[:10]))


def test_a_new_launch_path_without_a_compile_fails():
    """A mutation: the fused kernel's BLOCK_R floor raised from 16 to 32, a constexpr value never compiled."""
    missing, _ = _reach_small("block_r_32")
    assert missing and {e["kernel"] for e in missing} == {"lora_linear._fused_kernel"}, missing[:3]
    # the new ones are the BLOCK_R = 32 launches (the last two constexprs: BLOCK_R, GROUP_M = 8)
    assert all("('constexpr', 32), ('constexpr', 8)]" in e["text"] for e in missing), missing[:3]


def test_the_aligned_input_gradient_rows_are_compiled():
    """dx = dy W + G A with N and K multiples of 16 (ViT-B's 768 <-> 3072 MLP) runs the aligned rules, W transposed:
    the committed report holds those launches, compiled clean on sm_80 and sm_90 (the H200 table's 128x256 tile)."""
    from benchmarks import _triton_aot

    tables = _triton_aot.lora_tables()
    aligned = {f"{key}[{i}]" for key, rules in tables.items() for i, rule in enumerate(rules) if rule.get("aligned")}
    dx = [r for r in _committed_rows() if r["kernel"] == "lora_linear._fused_kernel" and r.get("launch") == "dx = dy W + G A"
          and r["config"].get("rule") in aligned and r.get("reached")]
    assert {r["arch"] for r in dx} == set(ARCHS)
    big = [r for r in dx if r["config"]["rule"] in ("NVIDIA H200[0]", "NVIDIA H200[3]")]
    assert big and {(r["config"]["BLOCK_M"], r["config"]["BLOCK_N"]) for r in big} == {(128, 256)}
    for r in dx:
        assert r["error"] is None and r["registers"] and r["smem_bytes"] <= r["smem_limit"], r
        assert not r["spills"] or not r["fast_path"], r

"""The csrc build outside pip: CMake (Torch's package + pybind11) with ctest, and setup.py's FORCE_CUDA build of the CUDA kernels."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    assert any(f.startswith("_C") and f.endswith(".so") for f in os.listdir(build))


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

"""The csrc build outside pip: CMake (Torch's package + pybind11) builds the ops and the C++ tests, and ctest passes."""
import os
import shutil
import subprocess

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

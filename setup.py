"""Build hello_fast: the Python package, its Triton kernels and the csrc extension (hello_fast._C).

The C++ (CPU) ops are always built. The CUDA sources are added when FORCE_CUDA=1 or a CUDA device
is visible. HELLO_FAST_SKIP_EXT=1 skips the extension entirely (the package then runs on its
PyTorch reference ops). TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0" when
no GPU is visible to ask). CUDA_HOME is honoured; otherwise it is found from the nvcc on PATH.
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def _is_cuda_home(path):
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def _find_cuda_home():
    """CUDA_HOME if set, else the toolkit behind the nvcc on PATH, else the standard location.

    On some machines the nvcc on PATH is a wrapper script in /usr/local/bin; torch would then guess
    /usr/local as CUDA_HOME and fail to link cudart. The toolkit is the `cuda` folder beside that bin.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "cuda"))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if _is_cuda_home(c):
            return c
    return None


def _cpu_simd_flags():
    """AVX2 + FMA (+F16C) for the CPU kernels when the building CPU has them (the extension is built where it runs).

    ATen's Vectorized<float> then uses 8-wide registers and Sleef's vector exp (exported by libtorch).
    HELLO_FAST_CPU_ARCH=generic builds portable scalar code instead.
    """
    import platform

    if os.environ.get("HELLO_FAST_CPU_ARCH", "native") == "generic" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return []
    if {"avx2", "fma", "f16c"} <= flags:  # the flags ATen builds its own AVX2 kernels with
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def _extensions():
    if os.environ.get("HELLO_FAST_SKIP_EXT", "0") == "1":
        print("hello_fast setup: HELLO_FAST_SKIP_EXT=1, not building hello_fast._C")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = cuda_home is not None and (force_cuda or torch.cuda.is_available())
    if force_cuda and cuda_home is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
    if with_cuda and not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # torch's build crashes on an empty arch list when it cannot ask a GPU
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/ops/cpu/*.cpp"))
    simd = _cpu_simd_flags()
    # -fopenmp: at::parallel_for is implemented in ATen's headers with `omp parallel` (torch's OpenMP
    # backend, whose libgomp torch ships and loads); without it every CPU kernel runs on one thread
    cxx_flags = ["-O3", "-fopenmp"] + simd  # the C++ standard is torch's choice (C++20 for torch >= 2.10)
    if with_cuda:
        cu_sources = sorted(glob.glob("csrc/ops/cuda/*.cu") + glob.glob("csrc/ops/cuda/*.cpp"))
        ext = CUDAExtension(
            "hello_fast._C",
            cpp_sources + cu_sources,
            define_macros=[("HELLO_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
        what = f"C++ and CUDA ops (arch list {os.environ.get('TORCH_CUDA_ARCH_LIST', 'from the visible GPU')}, CUDA_HOME={cuda_home})"
    else:
        ext = CppExtension("hello_fast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
        reason = "no CUDA toolkit found" if cuda_home is None else "no GPU visible and FORCE_CUDA unset"
        what = f"C++ (CPU) ops only ({reason})"
    print(f"hello_fast setup: building hello_fast._C with {what}: {len(ext.sources)} sources, "
          f"CPU kernels {'AVX2+FMA' if simd else 'generic'}")
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    package_dir={"hello_fast": "hello_fast", "hello_fast.kernels": "kernels"},
    packages=[
        "hello_fast",
        "hello_fast.data",
        "hello_fast.models",
        "hello_fast.ops",
        "hello_fast.projector",
        "hello_fast.stages",
        "hello_fast.kernels",
    ],
    package_data={"hello_fast": ["presets/*.yaml", "models/configs/*.json"], "hello_fast.kernels": ["configs/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

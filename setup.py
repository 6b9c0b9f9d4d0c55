"""Build hello_fast: the Python package, its Triton kernels and the csrc extension (hello_fast._C).

The C++ (CPU) ops are always built. The CUDA sources are added when FORCE_CUDA=1 or a CUDA device
is visible. HELLO_FAST_SKIP_EXT=1 skips the extension entirely (the package then runs on its
PyTorch reference ops). TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0" when
no GPU is visible to ask). CUDA_HOME is honoured; otherwise it is found from the nvcc on PATH.

The CPU kernels (csrc/ops/cpu/*.cpp) never depend on the building machine's CPU: each is compiled
for any x86-64 CPU and, on x86-64, once more with AVX2+FMA+F16C; the extension picks the build at
run time (csrc/cpu_dispatch.h). HELLO_FAST_CPU_ARCH overrides: `dispatch` (default), `generic` (no
AVX2 build), `native` (everything also with -march=native: fastest here, runs only on CPUs like it).

torch is needed to build but is not in pyproject's build requirements: build with
`pip install --no-build-isolation`, against the torch you run (the extension is tied to its ABI).
`python setup.py --cmake-config` prints these choices for CMakeLists.txt, which shares them.
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"
CPU_KERNEL_SOURCES = sorted(glob.glob("csrc/ops/cpu/*.cpp"))


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


# The flags ATen builds its own AVX2 kernels with; CPU_CAPABILITY puts ATen's Vectorized (8-wide, Sleef's vector
# exp from libtorch) in at::vec::AVX2, and csrc/cpu_dispatch.h names this build's namespace after it.
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
CPU_ARCHS = ("dispatch", "generic", "native")


def _cpu_builds():
    """(flags for every C++ source, {name: extra flags} of the extra builds of the CPU kernels) for HELLO_FAST_CPU_ARCH."""
    arch = os.environ.get("HELLO_FAST_CPU_ARCH", "dispatch") or "dispatch"
    if arch not in CPU_ARCHS:
        raise SystemExit(f"hello_fast setup: HELLO_FAST_CPU_ARCH must be one of {', '.join(CPU_ARCHS)}, got {arch!r}")
    base = ["-march=native"] if arch == "native" else []
    x86 = platform.machine().lower() in ("x86_64", "amd64") and os.name != "nt"  # GCC/Clang flags
    extra = {"avx2": AVX2_FLAGS} if x86 and arch != "generic" else {}
    return base, extra


def _cmake_config():
    """setup.py's build choices as CMake `set()` lines (CMakeLists.txt includes them: one place decides)."""
    base, extra = _cpu_builds()
    cuda_home = _find_cuda_home() or ""
    return "\n".join([
        f'set(HELLO_FAST_CUDA_HOME "{cuda_home}")',
        f'set(HELLO_FAST_CPU_BASE_FLAGS {" ".join(base)})',
        f'set(HELLO_FAST_CPU_AVX2_FLAGS {" ".join(extra.get("avx2", []))})',
    ])


def _build_ext_with_cpu_builds(build_ext_class, cpu_builds):
    """torch's BuildExtension, which also compiles the CPU kernel files once per extra CPU build.

    One setuptools Extension compiles every source with one set of flags; the extra builds are compiled here into
    their own folder with the extension's flags plus their own, and linked after the generic objects (the order
    csrc/cpu_dispatch.h relies on for inline functions both builds emit).
    """

    class BuildExt(build_ext_class):
        def build_extension(self, ext):
            generic_extra_objects = list(getattr(ext, "_generic_extra_objects", ext.extra_objects or []))
            ext._generic_extra_objects = generic_extra_objects
            objects = []
            for name, flags in cpu_builds.items():
                args = dict(ext.extra_compile_args)
                args["cxx"] = list(args["cxx"]) + flags
                objects += self.compiler.compile(
                    CPU_KERNEL_SOURCES, output_dir=os.path.join(self.build_temp, f"cpu_{name}"),
                    macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                    extra_postargs=args, depends=ext.depends)
            ext.extra_objects = generic_extra_objects + objects
            super().build_extension(ext)

    return BuildExt


def _extensions():
    if os.environ.get("HELLO_FAST_SKIP_EXT", "0") == "1":
        print("hello_fast setup: HELLO_FAST_SKIP_EXT=1, not building hello_fast._C")
        return [], {}
    cpu_base, cpu_builds = _cpu_builds()
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    try:
        import torch
    except ImportError:
        raise SystemExit("hello_fast setup: building hello_fast._C needs torch installed: `pip install torch`, then "
                         "`pip install --no-build-isolation .` (or HELLO_FAST_SKIP_EXT=1 to skip the extension)") from None
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = cuda_home is not None and (force_cuda or torch.cuda.is_available())
    if force_cuda and cuda_home is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
    if with_cuda and not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # torch's build crashes on an empty arch list when it cannot ask a GPU
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp")) + CPU_KERNEL_SOURCES
    # -fopenmp: at::parallel_for is implemented in ATen's headers with `omp parallel` (torch's OpenMP
    # backend, whose libgomp torch ships and loads); without it every CPU kernel runs on one thread
    cxx_flags = ["-O3", "-fopenmp"] + cpu_base  # the C++ standard is torch's choice (C++20 for torch >= 2.10)
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
    cpu = " + ".join(["native (-march=native)" if cpu_base else "generic"] + [f"{n} (chosen at run time)" for n in cpu_builds])
    print(f"hello_fast setup: building hello_fast._C with {what}: {len(ext.sources)} sources, CPU kernels {cpu}")
    return [ext], {"build_ext": _build_ext_with_cpu_builds(BuildExtension, cpu_builds)}


if sys.argv[1:] == ["--cmake-config"]:
    print(_cmake_config())
    sys.exit(0)


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

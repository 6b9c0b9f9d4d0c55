"""Shared fixtures: offline settings, a tiny procedural configuration, and one tiny finished run to inspect."""
from __future__ import annotations

import os
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the tests read the commands' stderr, so no progress output in it whatever the shell says; the commands
# the tests start inherit it (no test passes it again)
os.environ["HELLO_FAST_PROGRESS"] = "0"
try:  # without a GPU, Triton kernels are tested through the interpreter (set before triton is imported)
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

import pytest  # noqa: E402
import torch  # noqa: E402

from hello_fast.cli import main as cli_main  # noqa: E402

TINY = [
    "data.source=procedural", "data.procedural_classes=3", "data.procedural_per_class=16", "data.image_size=32",
    "data.num_classes=3", "data.train_scale=[0.5,1.0]",
    "clip.templates=simple",
    "teachers.width=8", "teachers.keep_epochs=[1,2]", "teachers.batch_size=16", "teachers.lr=0.05",
    # RDED's own tiling and crop scale (the digits preset takes whole images): the tiny runs exercise the tiles
    "select.factor=2", "select.crop_scale=[0.08,1.0]",
    "select.ipc=2", "select.candidates_per_class=6", "select.crops_per_image=2", "select.batch_size=32",
    "projector.conv_rank=2", "projector.head_rank=3", "projector.epochs=1", "projector.batch_size=16",
    "refine.enabled=true", "refine.steps=2", "refine.batch_size=8",
    "student.width=8", "student.epochs=2", "student.batch_size=4", "student.eval_every=1",
]


def tiny_sets(*extra: str, drop: tuple[str, ...] = ()) -> list[str]:
    """TINY and then `extra` as command-line arguments (`--set KEY=VALUE` pairs); TINY's items whose key starts
    with one of `drop` left out (a folder run drops ("data.source", "data.procedural", "data.num_classes"))."""
    items = [item for item in TINY if not item.startswith(tuple(drop))] + list(extra)
    return [arg for item in items for arg in ("--set", item)]


def tiny_config(*extra: str):
    from hello_fast.config import load_config

    cfg = load_config("digits", TINY + list(extra))
    cfg.name = "tiny"
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished tiny distill run (procedural data): (run directory, results)."""
    from hello_fast.pipeline import Pipeline

    out = tmp_path_factory.mktemp("tiny_run")
    results = Pipeline(tiny_config(), str(out), device="cpu").distill()
    return str(out), results


@pytest.fixture
def rng(request):
    """A fresh random generator; its seed is printed (shown with a failure) so the case can be replayed.

    HELLO_FAST_TEST_SEED=N replays one seed.
    """
    seed = int(os.environ.get("HELLO_FAST_TEST_SEED", torch.seed() % 2**31))
    print(f"{request.node.nodeid}: rng seed {seed} (replay: HELLO_FAST_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def cli_here(capsys):
    """`hello-fast ARGS` in this process: cli_here(*args) -> CompletedProcess (exit status, stdout, stderr).

    No interpreter start-up (importing torch and torchvision: 3-7 s a call on a 2-core CPU); the
    same `main` as the console script. Tests keep one subprocess call for the user's own path.
    """
    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = cli_main(list(args))
        except SystemExit as e:  # argparse's own errors
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    return run


def refuse_decoding(monkeypatch) -> None:
    """From now on in this test, opening an image, running the image check or loading a file set fails the test."""
    from hello_fast.data import sources, validate

    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr("PIL.Image.open", refuse)
    monkeypatch.setattr(validate, "check_images", refuse)
    monkeypatch.setattr(sources.FileImageSet, "load", refuse)


def has_cuda() -> bool:
    return torch.cuda.is_available()


# Out of the fast tier (`python -m pytest -m "not slow"`), with why: a module (every case), a case by its name
# (every parameter) or with its parameters, or (SLOW_FIXTURES) the cases using a fixture. Slow is: starting a
# process (a new interpreter imports torch: 3-7 s on 2 cores), a distill or stage run beyond the one shared tiny
# run, a compile (nvcc, Triton AOT, C++ build, torch.compile), full-size networks, or many seconds alone.
# Cases may also carry @pytest.mark.slow in their file.
SLOW = {
    "test_bad_data.py": "distill processes on fuzzed folders",
    "test_benchmark_scripts.py": "benchmark scripts as processes",
    "test_benchmarks.py": "pytest-benchmark entries (timings, not behaviour)",
    "test_build.py": "builds the extension (setup.py, CMake, ctest)",
    "test_cuda_emulated.py": "compiles the CUDA sources for the SIMT emulation",
    "test_digits_default.py": "the default digits run",
    "test_distributed.py": "torchrun processes",
    "test_extension.py": "interpreters without the extension",
    "test_gpu_static.py": "compiles the Triton kernels ahead of time",
    "test_relabeler_example.py": "the examples as processes",
    "test_resume.py": "distill processes, killed and rerun",
    "test_cli.py::test_help_explains": "an interpreter per subcommand",
    "test_cli.py::test_console_script_is_the_same_command": "the console script as a process",
    "test_cli.py::test_bad_inputs_give_one_line_errors": "the first error case as a process (the user's path)",
    "test_cli.py::test_inspect_prints_and_validates": "inspect as a process",
    "test_cli.py::test_distill_from_the_cli_on_a_folder": "a distill process on a JPEG folder",
    "test_cli.py::test_student_with_another_artifact": "a second distill (4 classes)",
    "test_cli.py::test_a_class_count_the_data_does_not_have_is_refused": "the student stage as a process",
    "test_custom_ops.py::test_without_the_extension_the_ops_are_declared_from_python": "an interpreter without the extension",
    "test_custom_ops.py::test_torch_compile_sees_each_op_as_one_node": "torch.compile",
    "test_custom_ops.py::test_compiled_range_checks_still_refuse": "torch.compile",
    "test_dali.py::test_distill_on_a_folder_with_the_dali_loader": "a distill process",
    "test_dali.py::test_student_trains_with_the_dali_backend": "students trained through DALI",
    "test_backbones.py::test_lite0_carries_a_real_imagenet_prior": "EfficientNet-Lite0 on a full-size photograph",
    "test_data.py::test_a_decoder_crash_inside_the_check_is_a_verdict": "worker processes that crash",
    "test_imports.py::test_every_module_imports_first": "a fresh interpreter",
    "test_imports.py::test_the_fresh_import_check_fails_on_a_broken_copy": "a fresh interpreter",
    "test_logs.py::test_a_killed_stage_rerun_logs_each_epoch_once": "teacher processes, killed and rerun",
    # the Triton interpreter on 2049-row and 1024x1271 problems (7-30 s each); the other odd shapes stay
    "test_lora_linear.py::test_triton_forward_and_backward_match_float64[lead3-45-1271-128-True-False]": "interpreter",
    "test_lora_linear.py::test_triton_forward_and_backward_match_float64[lead4-1024-1271-128-False-True]": "interpreter",
    "test_lora_linear.py::test_triton_forward_and_backward_match_float64[lead6-1024-37-5-True-False]": "interpreter",
    "test_observer.py::test_full_observer_trains_on_and_keeps_the_final_network": "a teacher run to the full observer",
    "test_projector.py::test_inject_lora_wraps_every_conv_of_rn50_with_the_papers_parameter_count": "a full-size RN50",
    "test_relabel_mix.py::test_from_a_finished_run": "a relabeling pass over a finished run",
    "test_relabel_mix.py::test_under_torch_compile": "torch.compile",
    "test_safe_loading.py::test_malicious_resume_checkpoint_stops_the_cli_cleanly": "the projector stage as a process",
    "test_safe_loading.py::test_every_bit_flip_of_a_checkpoint_is_refused_or_harmless": "13,000 checkpoint loads",
    "test_soft_label_loss.py::test_opcheck_and_compile": "torch.compile (inductor builds C++)",
    "test_stages.py::test_stages_learn_on_procedural_data": "a distill long enough to learn",
    "test_stages.py::test_rerun_skips_finished_stages_and_redoes_stale_ones": "a second distill",
    "test_stages.py::test_same_seed_same_result": "a second distill",
    "test_stages.py::test_students_by_name": "the student stage once per torchvision architecture",
    "test_status.py::test_on_a_folder_run_status_is_current_opens_no_image_and_writes_nothing": "a distill on a folder",
    "test_status.py::test_on_a_folder_run_a_touched_image_makes_the_data_new": "a distill on a folder",
    "test_storage.py::test_imagenet1k_ipc10_matches_the_paper": "full-size CLIP RN50 models, built to be counted",
    "test_storage.py::test_other_presets_match_the_papers_table_1": "full-size CLIP RN50 models, built to be counted",
    "test_storage.py::test_backbone_and_compact_artifact_sizes": "full-size CLIP RN50 models, built to be counted",
    "test_storage.py::test_storage_cli_json": "the command as a process",
    "test_storage.py::test_storage_benchmark_writes_its_results": "the benchmark script as a process",
    "test_study.py::test_a_study_writes_its_table_and_a_killed_one_resumes_without_redoing_cells": "eight students and three study reruns",
    "test_study.py::test_the_ablations_options_zero_shot_and_a_ce_probe": "three projector stages",
    "test_student_loop.py::test_fast_and_plain_loops_reach_the_same_results": "two distills",
    "test_student_loop.py::test_stored_source_in_the_pipeline": "the student stage with stored labels",
    "test_student_loop.py::test_bench_baselines_build_their_own_labelers": "every benchmark baseline's labeler",
}
# cases that use one of these fixtures
SLOW_FIXTURES = {
    "rn50": "a full-size CLIP RN50 (100 M weights) written and read in each published form",
}


def _slow_reason(item) -> str | None:
    module = item.path.name
    return (SLOW.get(module) or SLOW.get(f"{module}::{getattr(item, 'originalname', item.name)}")
            or SLOW.get(f"{module}::{item.name}")
            or next((why for name, why in SLOW_FIXTURES.items() if name in getattr(item, "fixturenames", ())), None))


def pytest_collection_modifyitems(config, items):
    """Marks the SLOW cases `slow`; GPU cases skip without CUDA (the `gpu` mark selects: a skipif object in its
    place selected nothing). Runs once per conftest that holds it (benchmarks' imports this one): idempotent."""
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("slow") is None and _slow_reason(item):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(no_cuda)


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request, monkeypatch):
    """In a run that leaves out `slow` (the fast tier), a case that starts a process fails, naming SLOW: so the
    tier stays fast as cases are added."""
    if request.node.get_closest_marker("slow") is None and "not slow" in (request.config.option.markexpr or ""):
        refuse_processes(request.node.nodeid, monkeypatch)


def refuse_processes(nodeid: str, monkeypatch) -> None:
    """subprocess.Popen (and so run, check_output...) raises, naming the case and where to list it, until monkeypatch undoes it."""
    def refuse(self, args, *rest, **kwargs):
        raise AssertionError(f"{nodeid} starts a process ({args!r:.120}) in the fast tier: list it in SLOW in "
                             "tests/conftest.py or mark it @pytest.mark.slow")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


gpu = pytest.mark.gpu  # `pytest -m gpu` selects these; without CUDA they skip (pytest_collection_modifyitems)


def triton_device():
    """Where Triton kernels run in this session: the GPU, or the CPU through the interpreter; None if neither."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None

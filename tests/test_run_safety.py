"""A run directory is safe: one writing process at a time, and a refused write (full disk, read-only, a file in the
way) stops with one line, leaves no temporary file, and the rerun goes on from the last checkpoint written whole."""
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY

from hello_fast._io import os_error_line, write_bytes
from hello_fast.checkpoint import load_checkpoint
from hello_fast.errors import HelloError
from hello_fast.logs import TrainingLog
from hello_fast.rundir import LOCK_NAME, RunDir

# three teacher epochs: a whole checkpoint after epoch 1, a second one written after epoch 2
TEACHERS = TINY + ["teachers.keep_epochs=[1,2,3]"]


def _args(out, extra=()):
    sets = [a for item in TEACHERS + list(extra) for a in ("--set", item)]
    return ["teachers", "--device", "cpu", "--quiet", "--out", str(out), *sets]


def _start(out, extra=()):
    env = dict(os.environ, HELLO_FAST_PROGRESS="0")
    return subprocess.Popen([sys.executable, "-m", "hello_fast", *_args(out, extra)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_lock(out, proc, timeout=300):
    """Until `proc` has taken the run directory's lock (its pid is in the lock file)."""
    path = os.path.join(out, LOCK_NAME)
    start = time.time()
    while time.time() - start < timeout:
        assert proc.poll() is None, proc.communicate()
        try:
            with open(path) as f:
                if json.load(f).get("pid") == proc.pid:
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("the run never took its lock")


def _error_lines(stderr):
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("hello-fast: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def _temporary_files(root):
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.startswith(".tmp-")]


# -- the lock ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_command_on_a_busy_run_directory_is_refused_and_the_first_finishes(tmp_path):
    out = tmp_path / "run"
    first = _start(out)
    _wait_for_lock(out, first)
    first.send_signal(signal.SIGSTOP)  # it holds the lock however long the second takes to start
    try:
        second = subprocess.run([sys.executable, "-m", "hello_fast", *_args(out)], capture_output=True, text=True,
                                env=dict(os.environ, HELLO_FAST_PROGRESS="0"), timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    line = _error_lines(second.stderr)
    assert second.stderr.strip() == line  # refused at once: nothing read, nothing trained
    assert f"run directory {out} is in use: pid {first.pid} on " in line
    assert "running `python -m hello_fast teachers" in line and f"kill {first.pid}" in line and "--out" in line
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert "in use" not in err
    assert json.loads((out / "teachers" / "done.json").read_text())["stage"] == "teachers"


@pytest.mark.slow
def test_a_lock_holder_killed_with_sigkill_does_not_block_the_next_run(tmp_path, cli_here):
    out = tmp_path / "run"
    first = _start(out)
    _wait_for_lock(out, first)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert first.returncode == -signal.SIGKILL
    again = cli_here(*_args(out))
    assert again.returncode == 0, again.stderr
    assert "in use" not in again.stderr
    assert (out / "teachers" / "done.json").is_file()


@pytest.mark.slow
def test_a_forked_worker_that_outlives_its_killed_holder_does_not_keep_the_lock(tmp_path):
    """DataLoader and image-check workers are forked while the lock is held and share its open file."""
    script = (
        "import os, sys, time\n"
        "from hello_fast.rundir import RunDir\n"
        "held = RunDir(sys.argv[1]).lock()\n"
        "held.__enter__()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    null = os.open(os.devnull, os.O_WRONLY)\n"
        "    os.dup2(null, 1), os.dup2(null, 2)  # the test reads the holder's output to its end\n"
        "    time.sleep(120)\n"
        "    os._exit(0)\n"
        "print(child, flush=True)\n"
        "os.kill(os.getpid(), 9)\n")
    holder = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert holder.returncode == -signal.SIGKILL, holder.stderr
    worker = int(holder.stdout.split()[0])
    try:
        os.kill(worker, 0)  # the worker still runs
        with RunDir(str(tmp_path)).lock():  # ... and the run directory is free
            pass
    finally:
        os.kill(worker, signal.SIGKILL)


def _free(path) -> bool:
    """Whether another open of the lock file could take it now (flock: two opens conflict even in one process)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_the_lock_is_reentrant_in_its_process_and_released_after(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    path = str(tmp_path / "run" / LOCK_NAME)
    with run.lock():
        with RunDir(run.root).lock():  # a Pipeline's stages take it again inside distill
            assert not _free(path)
        assert not _free(path)  # the inner release leaves the outer hold
        holder = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and "since" in holder and "command" in holder
    assert _free(path)


def test_a_filesystem_without_locks_warns_and_runs(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with RunDir(str(tmp_path / "run")).lock():
        pass
    assert "cannot lock files (No locks available)" in capsys.readouterr().err


# -- refused writes as one line ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_enospc_while_saving_a_checkpoint_says_so_in_one_line_and_the_rerun_resumes(tmp_path, monkeypatch, cli_here):
    """The real save path (torch serialisation, write_bytes, the CLI) with the OS answering ENOSPC to the second
    checkpoint's write: no tmpfs needed, so it runs everywhere."""
    real_open, real_write = os.open, os.write
    checkpoints = []

    def recording_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if str(path).endswith("-checkpoint.pt") and not flags & os.O_CREAT:  # write_bytes's, not mkstemp's
            checkpoints.append(fd)
        return fd

    def full_disk_write(fd, data):
        if len(checkpoints) >= 2 and fd == checkpoints[-1]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    out = tmp_path / "run"
    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "write", full_disk_write)
    failed = cli_here(*_args(out))
    monkeypatch.undo()
    assert failed.returncode == 2
    line = _error_lines(failed.stderr)
    checkpoint = out / ".partial" / "teachers" / "checkpoint.pt"
    assert line.startswith(f"hello-fast: error: no space left on the device: could not write the checkpoint {checkpoint} (")
    assert " bytes needed; " in line and " free there)" in line and "run the same command again" in line
    assert _temporary_files(out) == []
    assert load_checkpoint(str(checkpoint))["epoch"] == 1  # the last checkpoint written whole
    assert not (out / "teachers").exists()
    again = cli_here(*_args(out))
    assert again.returncode == 0, again.stderr
    assert "teachers: resuming from the checkpoint after epoch 1" in again.stderr
    assert (out / "teachers" / "done.json").is_file() and _temporary_files(out) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (a real "no space left on device"); skipped where this process may not mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_filesystem_stops_with_one_line_and_the_rerun_resumes(small_disk, cli_here):
    out = small_disk / "run"
    failed = subprocess.run([sys.executable, "-m", "hello_fast", *_args(out)], capture_output=True, text=True,
                            env=dict(os.environ, HELLO_FAST_PROGRESS="0"), timeout=600)
    assert failed.returncode == 2
    line = _error_lines(failed.stderr)
    checkpoint = out / ".partial" / "teachers" / "checkpoint.pt"
    assert f"no space left on the device: could not write the checkpoint {checkpoint} (" in line
    needed, free = [int(w.replace(",", "")) for w in line.split(" (", 1)[1].split(")")[0].split() if w[0].isdigit()]
    assert needed > free
    assert _temporary_files(out) == []
    assert load_checkpoint(str(checkpoint))["epoch"] == 1
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # the user frees space
    again = cli_here(*_args(out))
    assert again.returncode == 0, again.stderr
    assert "teachers: resuming from the checkpoint after epoch 1" in again.stderr
    assert (out / "teachers" / "done.json").is_file()


def test_a_file_where_the_run_directory_should_be_is_one_line(tmp_path, cli_here):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    res = cli_here(*_args(blocker / "run"))
    assert res.returncode == 2
    line = _error_lines(res.stderr)
    assert line == (f"hello-fast: error: {blocker} is a file, not a folder: could not create the run directory's lock "
                    f"file {blocker}/run/{LOCK_NAME}; move the file away (or choose another --out) and run the same "
                    f"command again: finished stages are kept and an interrupted one resumes from its last checkpoint")


@pytest.mark.slow
def test_a_read_only_filesystem_is_one_line(tmp_path, cli_here):
    disk = tmp_path / "ro"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        res = cli_here(*_args(disk / "run"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    assert res.returncode == 2
    assert _error_lines(res.stderr).startswith(
        f"hello-fast: error: read-only filesystem: could not create the run directory's lock file {disk}/run/{LOCK_NAME};")


def test_permission_denied_names_the_path_and_the_operation(tmp_path):
    path = str(tmp_path / "run" / "checkpoint.pt")
    line = os_error_line(PermissionError(errno.EACCES, "Permission denied", path + ".tmp"), "write the checkpoint", path)
    assert line.startswith(f"permission denied: could not write the checkpoint {path}; fix its permissions")
    assert os_error_line(OSError(errno.EIO, "I/O error"), "write the checkpoint", path) is None  # not the user's to fix


def test_write_bytes_refuses_a_write_larger_than_the_free_space_before_writing(tmp_path, monkeypatch):
    import hello_fast._io as io_module

    target = tmp_path / "cache.npz"
    target.write_bytes(b"old")
    monkeypatch.setattr(io_module, "free_bytes", lambda path: 1000)
    with pytest.raises(HelloError, match=r"could not write the image-check cache .*cache\.npz \(4,096 bytes needed; 1,000 free"):
        write_bytes(str(target), bytes(4096), "image-check cache")
    assert target.read_bytes() == b"old" and _temporary_files(tmp_path) == []


def test_the_training_log_and_the_image_check_cache_say_what_they_could_not_write(tmp_path):
    from hello_fast.data.validate import check_images

    blocker = tmp_path / "logs"
    blocker.write_text("a file")
    with pytest.raises(HelloError, match=f"{blocker} is a file, not a folder: could not create the training log folder"):
        TrainingLog(str(blocker / "teachers"))
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (4, 4)).save(image)
    with pytest.raises(HelloError, match=f"{blocker} is a file, not a folder: could not write the image-check cache"):
        check_images([str(image)], cache=str(blocker / "image_check.npz"))


@pytest.mark.slow
def test_a_refused_training_log_write_is_one_line_and_nothing_more(tmp_path):
    """A log write the OS refuses (here a real EFBIG: a 300-byte `ulimit -f`): one line, no traceback from
    TensorBoard's writer thread, and no unflushed CSV row tried again at exit ('Exception ignored')."""
    script = (
        "import resource, sys\n"
        "from hello_fast.logs import TrainingLog\n"
        "from hello_fast.errors import HelloError\n"
        "log = TrainingLog(sys.argv[1])\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))\n"
        "try:\n"
        "    for epoch in range(1, 100):\n"
        "        log.begin_epoch()\n"
        "        log.end_epoch(epoch, val_top1=50.0)\n"
        "except HelloError as e:\n"
        "    print(e, file=sys.stderr)\n")
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "logs")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0
    # the CSV's row or TensorBoard's event file (written in a thread of its own), whichever passed the limit first
    assert res.stderr.startswith("file too large: could not write the "), res.stderr
    assert str(tmp_path / "logs") in res.stderr and "Exception" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr

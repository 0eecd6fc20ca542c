"""`python -m ptv2 ARGS` (or another module or script) as a process of its own, forked from a server that imported
torch, transformers and ptv2 once per test worker (multiprocessing's forkserver), for the tests of signals, process
limits, W&B's service and several processes.

A fresh interpreter spends about 3 s of CPU importing before a tiny run starts; a forked child inherits only those
imports. It sets its own environment, working folder, standard streams and file-size limit before ptv2 starts, and
runs the interpreter's exit handlers after, as `python -m ptv2` would. conftest.ptv2_subprocess starts it; the
console-script tests (test_data_folders, test_superglue_tasks, test_first_hour's `make demo`) keep a fresh
interpreter."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# What a train, eval or predict run imports; the server imports them before its first fork.
PRELOAD = [
    "torch",
    "transformers",
    "transformers.models.bert.modeling_bert",
    "datasets",
    "accelerate",
    "peft",
    "wandb",
    "hydra",
    "seqeval.metrics",
    "ptv2.cli",
    "ptv2.loop",
    "ptv2.commands.train",
    "ptv2.commands.evaluate",
    "ptv2.commands.predict",
    "ptv2.commands.packed",
]
_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(PRELOAD)


def _child(argv: list[str], env: dict[str, str], cwd: str, out: str, err: str, file_size_limit: int | None):
    """In the forked child: this process becomes `python ARGV` (`-m MODULE ARGS` or `SCRIPT ARGS`)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    if file_size_limit is not None:  # a write past it fails with EFBIG instead of killing the process
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    if any(name.startswith("PTV2_DIE_") for name in env):  # the test's faults (tests/faults.py)
        sys.path.insert(0, str(Path(__file__).parent))
        import faults

        faults.install(env)
    try:
        if argv[0] == "-m":
            sys.argv = argv[1:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        atexit._run_exitfuncs()


class ForkedProcess:
    """A started `python ARGV`; wait() gives what subprocess.run(capture_output=True, text=True) gives."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd=None, file_size_limit: int | None = None):
        self.args = [sys.executable, *argv]
        self._streams = Path(tempfile.mkdtemp(prefix="ptv2-forked-"))
        out, err = self._streams / "stdout", self._streams / "stderr"
        where = str(cwd or os.getcwd())
        self._process = _FORKS.Process(
            target=_child, args=(list(argv), env, where, str(out), str(err), file_size_limit), daemon=False
        )
        self._process.start()

    def send_signal(self, number: int) -> None:
        os.kill(self._process.pid, number)

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        self._process.join(timeout)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join()
            raise subprocess.TimeoutExpired(self.args, timeout)
        out, err = (
            (self._streams / name).read_text(encoding="utf-8", errors="replace") for name in ("stdout", "stderr")
        )
        for name in ("stdout", "stderr"):
            (self._streams / name).unlink()
        self._streams.rmdir()
        return subprocess.CompletedProcess(self.args, self._process.exitcode, out, err)

"""The matsim command as the tests run it.

`matsim` starts a real `python -m sim`: for what only a process shows (its exit
status, runs, logs). `matsim_here` calls the same entry point in this process, with
its own stdout and stderr, for answers to bad input: the same code path from argv to
exit status without an interpreter and torch to start (2-3 s a case on 2 cores)."""
import contextlib
import io
import subprocess
import sys

from sim.cli import main


def matsim(*argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sim", *argv], capture_output=True, text=True, timeout=timeout)


def matsim_here(*argv) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:   # argparse's --help and --version exit
            code = exit_.code
    return subprocess.CompletedProcess(["matsim", *argv], code, out.getvalue(), err.getvalue())

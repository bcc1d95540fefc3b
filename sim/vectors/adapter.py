"""The implementation under test: a subprocess speaking the conformance protocol
(vectors/FORMAT.md), one request at a time, each answer awaited under a timeout."""
import json
import queue
import shlex
import subprocess
import threading
from pathlib import Path

from sim.conformance import FORMAT, VERSION
from sim.vectors.store import VectorsError

# Waiting for an implementation's hello is a hang guard, not the per-case timeout: starting one
# (an interpreter importing torch, a Rust binary loading libtorch) takes seconds on a busy machine.
STARTUP_S = 120.0


class AdapterTrouble(Exception):
    """What went wrong with one request: the case fails with this reason."""


class Adapter:
    """The implementation under test, as a subprocess speaking the protocol."""

    def __init__(self, command: str, directory: Path, timeout_s: float):
        self.command, self.directory, self.timeout_s = command, directory, timeout_s
        self.process, self.lines = None, None
        self.ops = self.start()

    def start(self) -> set[str]:
        try:
            argv = shlex.split(self.command)
            self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, text=True, bufsize=1)
        except (OSError, ValueError) as err:
            raise VectorsError(f"--impl {self.command!r} cannot be started ({type(err).__name__}: {err})") from None
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.process.stdout, self.lines), daemon=True).start()
        try:
            hello = self.ask({"hello": {"format": FORMAT, "version": VERSION, "dir": str(self.directory.resolve())}},
                             max(self.timeout_s, STARTUP_S))
        except AdapterTrouble as trouble:
            self.stop()
            raise VectorsError(f"--impl {self.command!r} did not answer the hello: {trouble}") from None
        return set(hello.get("hello", {}).get("ops", []))

    @staticmethod
    def _read(stream, lines: queue.Queue) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)   # end of output: the process exited

    def ask(self, request: dict, timeout_s: float | None = None) -> dict:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise AdapterTrouble(f"the implementation exited (status {self.process.poll()})") from None
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AdapterTrouble(f"no answer within {timeout_s:g} s") from None
        if line is None:
            self.process.wait(timeout=timeout_s)
            raise AdapterTrouble(f"the implementation exited (status {self.process.poll()})")
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            raise AdapterTrouble(f"the answer is not JSON: {line.strip()[:80]!r}") from None
        if not isinstance(reply, dict):
            raise AdapterTrouble(f"the answer is not a JSON object: {line.strip()[:80]!r}")
        return reply

    def restart(self) -> None:
        self.stop()
        self.ops = self.start()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
        if self.process:
            self.process.wait()



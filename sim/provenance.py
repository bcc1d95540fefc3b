"""Where a figure comes from: every file of measurements matsim or its scripts write carries
`stamp()`, so a number in the README or the docs names the commit that produced it, whether
that checkout had uncommitted changes, the machine and the date (house rule 10)."""
import datetime
import os
import platform
import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent   # the checkout, when matsim runs from one


def _git(*args: str, source: Path = SOURCE) -> str | None:
    if not (source / ".git").exists():   # an installed package: never an enclosing repository's commit
        return None
    try:
        out = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def stamp(source: str | Path = SOURCE) -> dict:
    """{commit, dirty, date, machine}: commit None outside a git checkout (an installed wheel);
    dirty when tracked files differ from that commit. `source`: another checkout measured."""
    import torch
    source = Path(source)
    commit = _git("rev-parse", "HEAD", source=source)
    status = _git("status", "--porcelain", "--untracked-files=no", source=source) if commit else None
    return {
        "commit": commit,
        "dirty": bool(status) if status is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }

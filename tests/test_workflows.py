"""The GitHub workflows are valid as GitHub reads them: actionlint (syntax, expressions, each
action's inputs, deprecated runtimes) passes on every workflow, and fails on a broken one."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ACTIONLINT = Path(sys.executable).parent / "actionlint"
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))


def actionlint(*paths):
    return subprocess.run([str(ACTIONLINT), "-no-color", *map(str, paths)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_there_are_workflows_and_actionlint_is_installed():
    assert {path.name for path in WORKFLOWS} >= {"ci.yml", "nightly.yml"}
    assert ACTIONLINT.is_file(), "actionlint comes with the test extras (pyproject.toml)"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda path: path.name)
def test_every_workflow_passes_actionlint(workflow):
    result = actionlint(workflow)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("mistake, expected", [
    (("uses: actions/checkout@v5", "uses: actions/checkout@v3"), "retired"),  # its node runtime
    (("timeout-minutes: 300", "timeout-minutes: five hours"), "timeout-minutes"),
    (("workflow_conclusion: completed", "workflow_conclusions: completed"), "workflow_conclusions"),
    (("${{ vars.TORCH_INDEX_URL }}", "${{ vars.TORCH_INDEX_URL "), "expression"),
])
def test_actionlint_rejects_a_broken_nightly_workflow(tmp_path, mistake, expected):
    old, new = mistake
    text = (REPO / ".github" / "workflows" / "nightly.yml").read_text()
    assert old in text
    broken = tmp_path / ".github" / "workflows" / "nightly.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace(old, new, 1))
    result = actionlint(broken)
    assert result.returncode == 1 and expected in result.stdout.lower(), result.stdout + result.stderr

"""Every finding of the findings page still holds: each reproduction (scripts/findings.py) run
at smoke size. The ones that read Psyche's own files skip, saying so, without a checkout
($MATSIM_PSYCHE, tests/psyche.py). A finding only a full-size run can show (the 20m gap) runs
its command at smoke size here, and holds in its published full-size measurement."""
import dataclasses
import json
import math

import pytest

from scripts import CHECKOUT
from scripts.findings import FINDINGS


@pytest.mark.parametrize("name", sorted(FINDINGS))
def test_each_finding_still_holds_at_smoke_size(name):
    finding = FINDINGS[name]
    psyche = None
    if finding.needs_psyche:
        from tests.psyche import checkout
        psyche = str(checkout())
    figures = finding.reproduce(True, psyche)
    assert finding.summary(figures)   # the page's sentence renders from the figures
    if finding.smoke_shows_it:
        assert figures["holds"], f"{name} no longer holds: {figures}"
    else:
        assert all(math.isfinite(v) for v in figures.values() if isinstance(v, float)), figures
        published = json.loads((CHECKOUT / "docs" / "data" / "findings.json").read_text())["findings"][name]
        assert published["holds"] and not published["smoke"] and published["commit"], published


def test_a_finding_that_no_longer_holds_fails_its_command(monkeypatch, tmp_path, capsys):
    """The command's exit status reads `holds`: a reproduction whose figures say the finding is
    gone exits 1 and says so (here the micro-batch one, with Psyche's weighting fixed)."""
    import scripts.findings as findings
    fixed = lambda smoke, psyche=None: {"relative_difference": {"5_in_2": 0.0, "6_in_3": 0.0}, "holds": False}
    monkeypatch.setitem(findings.FINDINGS, "micro-batch-weighting",
                        dataclasses.replace(findings.FINDINGS["micro-batch-weighting"], reproduce=fixed))
    assert findings.main(["micro-batch-weighting", "--smoke", "--out", str(tmp_path / "f.json")]) == 1
    assert "DOES NOT HOLD" in capsys.readouterr().out

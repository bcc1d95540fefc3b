"""The docs' figures are their files': every table marked in README.md and docs/ is what
scripts/tables.py renders from its measurement file (docs/data/*.json), and every such file
names the commit that produced it (house rule 10)."""
import json

import pytest

from scripts import CHECKOUT, tables


def test_every_generated_table_equals_what_its_file_renders():
    assert tables.stale() == [], "run: .venv/bin/python -m scripts.tables"


def test_every_table_name_a_page_marks_is_known_and_every_known_table_is_on_a_page():
    marked = {m["name"] for page in tables.pages() for m in tables.MARKED.finditer(page.read_text())}
    assert marked == set(tables.TABLES), (marked ^ set(tables.TABLES))


@pytest.mark.parametrize("path", sorted((CHECKOUT / "docs" / "data").glob("*.json")), ids=lambda p: p.name)
def test_every_measurement_file_names_its_commit_machine_and_date(path):
    data = json.loads(path.read_text())
    stamps = list(data["findings"].values()) if path.name == "findings.json" else [data.get("provenance", data)]
    for stamp in stamps:
        assert len(stamp["commit"]) == 40 and stamp["dirty"] in (True, False), path.name
        assert stamp["machine"]["cores"] >= 1 and stamp["machine"]["torch"] and stamp["date"][:2] == "20", path.name


def test_a_hand_edited_figure_is_caught(tmp_path, monkeypatch):
    """The check can fail: a page whose table was edited by hand (one digit) is stale, and
    rewriting it restores the generated text."""
    page = next(p for p in tables.pages() if "<!-- table: bandwidth -->" in p.read_text())
    copy = tmp_path / "docs" / "page.md"
    copy.parent.mkdir()
    original = page.read_text()
    body = original.split("<!-- table: bandwidth -->\n", 1)[1]
    edited = original.replace(body, body.replace("B |", "B | ", 1), 1)
    copy.write_text(edited)
    monkeypatch.setattr(tables, "CHECKOUT", tmp_path)
    monkeypatch.setattr(tables, "PAGES", ("docs/*.md",))
    assert tables.stale() == ["docs/page.md"]
    assert tables.main([]) == 0 and tables.stale() == [] and copy.read_text() == original


def test_a_measurement_without_its_commit_cannot_be_published(monkeypatch):
    monkeypatch.setattr(tables, "load", lambda name: {"commit": None, "tiers": {}})
    with pytest.raises(SystemExit, match="names no commit"):
        tables.source(tables.load("x"), "python -m scripts.x")

"""docs/protocol.md: its generated tables match the code (vfiouser_srv/docgen.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfiouser_srv import docgen


def test_generated_sections_are_up_to_date() -> None:
    stale = docgen.stale_sections()
    assert not stale, f"docs/protocol.md is stale in {stale}: run `{docgen.COMMAND}`"


def test_regenerating_fills_empty_sections_and_keeps_the_prose(tmp_path: Path) -> None:
    doc = tmp_path / "protocol.md"
    text = "intro\n" + "".join(
        f"<!-- BEGIN GENERATED {name}: x -->\nold\n<!-- END GENERATED {name} -->\nprose {name}\n"
        for name in docgen.SECTIONS
    )
    doc.write_text(text)
    assert docgen.stale_sections(doc) == list(docgen.SECTIONS)
    assert docgen.main([str(doc)]) == 0
    assert docgen.stale_sections(doc) == []
    new = doc.read_text()
    assert new.startswith("intro\n") and all(f"prose {n}\n" in new for n in docgen.SECTIONS)
    assert "old\n" not in new
    assert docgen.main(["--check", str(doc)]) == 0


def test_a_missing_section_is_an_error(tmp_path: Path) -> None:
    doc = tmp_path / "protocol.md"
    doc.write_text("no markers\n")
    assert docgen.main(["--check", str(doc)]) == 1
    with pytest.raises(ValueError, match="phases"):
        docgen.main([str(doc)])


def test_every_body_and_phase_row_is_documented() -> None:
    text = docgen.DOC.read_text()
    from protocol import PHASE_TABLE, REPLIES, REQUESTS

    for cls in [*REQUESTS.values(), *REPLIES.values()]:
        assert f"`{cls.__name__}`" in text, cls
    assert len(PHASE_TABLE) > 0 and "`await-version`" in text

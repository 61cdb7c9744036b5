"""docs/ROUTERS.md cannot drift from the registry: one table row per registered router, naming every
option `router_option_defaults` lists, with its default."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperrouter.routers import ROUTERS, router_option_defaults

DOC = Path(__file__).resolve().parents[1] / "docs" / "ROUTERS.md"
HEADING = "## The router table"
COLUMNS = 7  # name, paper, what trains, extra compute, aux losses, options, differences


def table_rows() -> dict[str, str]:
    """Router name -> its row of the router table (the rows whose first cell is `name`)."""
    text = DOC.read_text(encoding="utf-8")
    assert HEADING in text, f"{DOC} has no {HEADING!r} section"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == COLUMNS, f"row {cells[0]} has {len(cells)} cells, not {COLUMNS}"
        name = cells[0].strip("`")
        assert name not in rows, f"router {name!r} has two rows"
        rows[name] = line
    return rows


ROWS = table_rows()


def test_every_registered_router_has_a_row_and_every_row_a_router() -> None:
    missing = sorted(set(ROUTERS) - set(ROWS))
    unknown = sorted(set(ROWS) - set(ROUTERS))
    assert not missing, f"docs/ROUTERS.md's router table lacks {missing}"
    assert not unknown, f"docs/ROUTERS.md's router table lists unregistered routers {unknown}"


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_the_row_lists_every_option_with_its_default(name: str) -> None:
    row = ROWS.get(name, "")
    absent = [
        f"{option}={default!r}"
        for option, default in router_option_defaults(name).items()
        if f"`{option}={default!r}`" not in row
    ]
    assert not absent, f"the {name!r} row of docs/ROUTERS.md lacks options {absent}"

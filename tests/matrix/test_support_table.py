"""The architecture support table in docs/models.md is the matrix's expectations, rendered
(`make matrix-table`)."""

from pathlib import Path

from matrix_support import EXPECTED, PRIMITIVES, render_table, table_block

from mechinterp.models.tiny import FAMILIES

PAGE = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def test_support_table_is_rendered_from_the_matrix():
    assert table_block(PAGE.read_text()) == render_table(), (
        "docs/models.md's architecture table differs from tests/matrix: run `make matrix-table`"
    )


def test_every_refusal_names_a_family_and_a_matrix_cell():
    assert set(EXPECTED) == set(FAMILIES)
    for cells in EXPECTED.values():
        assert set(cells) <= set(PRIMITIVES)

"""The README's architecture table is the matrix's expectations, rendered (`make matrix-table`)."""

from pathlib import Path

from matrix_support import EXPECTED, PRIMITIVES, readme_block, render_table

from mechinterp.models.tiny import FAMILIES

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_is_rendered_from_the_matrix():
    assert readme_block(README.read_text()) == render_table(), (
        "README.md's architecture table differs from tests/matrix: run `make matrix-table`"
    )


def test_every_refusal_names_a_family_and_a_matrix_cell():
    assert set(EXPECTED) == set(FAMILIES)
    for cells in EXPECTED.values():
        assert set(cells) <= set(PRIMITIVES)

"""What the architecture matrix expects of each family, and what it measured.

`EXPECTED[family][primitive]` is absent for a supported cell and holds the regex of the refusal's
error message for a cell the primitive must refuse. The README's support table is rendered from
it (`render_table`), and `tests/matrix/test_readme_table.py` fails when the README disagrees.
`record` keeps each cell's largest |ours − reference|; `make matrix` writes them to JSON.
"""

from __future__ import annotations

import json
import os

from mechinterp.models.tiny import FAMILIES

#: Columns of the README table, in order (each is one test of test_architectures.py).
PRIMITIVES = (
    "run_from_layer",
    "patch_heads",
    "patch_heads per position",
    "patch_from",
    "joint sets",
    "knockout zero",
    "knockout mean",
    "knockout resample",
    "knockout uniform_attention",
    "knockout edge_knockout",
    "knockout in cached generation",
    "retrieval score",
    "QR score",
    "cached generation",
    "cross_patch all heads",
)

EXPECTED: dict[str, dict[str, str]] = {name: {} for name in FAMILIES}

RESULTS: dict[str, dict[str, dict]] = {}


def record(family: str, primitive: str, diff: float | None, scale: float | None) -> None:
    """Keep the cell's measured largest difference (None for a refusal) and its scale."""
    if primitive not in PRIMITIVES:
        raise KeyError(f"{primitive!r} is not a column of the matrix (PRIMITIVES)")
    RESULTS.setdefault(family, {})[primitive] = {"max_abs_diff": diff, "scale": scale}


def write_results(path: str | os.PathLike) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(RESULTS, f, indent=1, sort_keys=True)
    os.replace(tmp, path)

"""Integration: knocking out the embedded model's top retrieval heads breaks NIAH retrieval far
more than knocking out as many random heads from the complement (measured values in the note of
each assert; the ranking is the one `mechinterp detect` measured, see the README)."""

import pytest

from mechinterp.experiments import KNOCKOUT_TASK, build_examples
from mechinterp.heads import parse_heads
from mechinterp.interventions.sweep import knockout_sweep, summarise_sweep

pytestmark = pytest.mark.integration

TOP_RETRIEVAL = parse_heads("L17H3 L18H6 L18H7 L23H2 L17H4 L20H6 L23H7 L21H8 L24H4 L23H1")


@pytest.fixture(scope="module")
def sweep(smollm):
    examples = build_examples(KNOCKOUT_TASK, smollm.tokenizer)  # 4 needles × 256/512 × 2 depths
    df = knockout_sweep(
        smollm, examples, TOP_RETRIEVAL, ks=(10,), seeds=(0, 1), modes=("zero",), progress=False
    )
    return summarise_sweep(df).set_index("condition")["correct"]


def test_top_retrieval_knockout_hurts_more_than_random_complement_knockout(sweep):
    base, top, rand = sweep["none"], sweep["top"], sweep["random"]
    assert base >= 0.75  # measured 0.94
    assert top <= base - 0.5  # measured 0.00
    assert rand >= base - 0.25  # measured 1.00 (seeds 0, 1)
    assert rand - top >= 0.5

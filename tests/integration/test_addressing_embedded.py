"""Integration: on the embedded model, an address pair moves where the retrieval heads look, and
path patching with their attention as the metric finds who steers them: the heads that read the
question into their queries under a question swap, a previous-token head into their keys under a
key swap (the study's `addressing:` stage; measured values beside each assert)."""

import pandas as pd
import pytest

from mechinterp.experiments.study.stages import address_shard
from mechinterp.tasks.address import address_pairs

pytestmark = pytest.mark.integration

#: The demo study's 10 best retrieval heads.
RECEIVERS = "L17H3,L18H6,L18H7,L23H2,L20H6,L17H4,L23H7,L21H8,L24H4,L23H1".split(",")
NEEDLES = [0, 1, 3, 4, 5, 7, 8, 9, 10, 11, 13, 14]  # the grid its haystacks are drawn for


@pytest.fixture(scope="module")
def patterns(smollm):
    from mechinterp.experiments.study.stages import pattern_shard

    return pattern_shard(smollm)


def _rows(model, kind: str, example_id: str, patterns: pd.DataFrame) -> pd.DataFrame:
    pairs = address_pairs(kind, model.tokenizer, lengths=[300], depths=[0.75], needles=NEEDLES,
                          seed=2)  # fmt: skip
    (pair,) = [p for p in pairs if p.clean.id == example_id]
    return address_shard(model, kind=kind, clean=pair.clean.to_dict(),
                         corrupt=pair.corrupt.to_dict(), key=pair.key,
                         substitute=pair.substitute, receivers=RECEIVERS,
                         patterns=patterns.to_dict("records"), size=5, draws=2,
                         at="divergence", via_mlps=True, batch_size=32, max_new_tokens=24,
                         template=None)  # fmt: skip


def _upstream(rows: pd.DataFrame, inp: str) -> float:
    up = rows[(rows["kind"] == "set") & (rows["head_name"] == "upstream")]
    return float(up.loc[up["receiver_input"] == inp, "recovery"].iloc[0])


def _top(rows: pd.DataFrame, inp: str, n: int) -> list[str]:
    s = rows[(rows["kind"] == "sender") & (rows["receiver_input"] == inp)]
    return list(s.nlargest(n, "recovery")["head_name"])


def test_a_question_swap_is_steered_through_the_queries(smollm, patterns):
    rows = _rows(smollm, "question_swap", "niah-n3-L300-d0.75-s2-qswap", patterns)
    pair = rows[rows["kind"] == "pair"].iloc[0]
    assert pair["apart"]  # clean: the Riverside mascot; corrupt: Captain Ishida's treasure
    sets = rows[rows["kind"] == "set"].iloc[0]
    assert sets["clean_metric"] - sets["corrupt_metric"] > 0.03  # measured 0.066
    assert _upstream(rows, "q") > 1.0 and _upstream(rows, "k") < 0.2  # measured 1.73, -0.38
    assert "L19H1" in _top(rows, "q", 2)  # measured first, 0.47
    # each receiver's own query, patched back alone, restores most of the move (A against B)
    mass = rows[(rows["kind"] == "mass") & (rows["node"] == "q")]
    sign = mass["needle"].map({0: 1.0, 1: -1.0})
    moved = ((mass["clean_mass"] - mass["corrupt_mass"]) * sign).sum()
    back = ((mass["patched_mass"] - mass["corrupt_mass"]) * sign).sum()
    assert back / moved > 0.7


def test_a_key_swap_is_steered_through_the_keys_by_a_previous_token_head(smollm, patterns):
    rows = _rows(smollm, "key_swap", "niah-n4-L300-d0.75-s2-kswap", patterns)
    assert rows[rows["kind"] == "pair"].iloc[0]["apart"]
    sets = rows[rows["kind"] == "set"].iloc[0]
    assert sets["clean_metric"] - sets["corrupt_metric"] > 0.03  # measured 0.065
    assert _upstream(rows, "k") > 0.5  # measured 0.85
    assert _top(rows, "k", 1) == ["L16H0"]  # measured 0.59 of the move
    prev = patterns.set_index("name").loc["L16H0", "previous_token"]
    assert prev > 0.7  # measured 0.88: a previous-token head (K-composition)

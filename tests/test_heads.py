import pytest

from mechinterp.heads import Head, HeadShape, parse_heads


def test_head_prints_and_parses_all_forms():
    assert str(Head(18, 6)) == "L18H6"
    assert Head(18, 6).wu_key == "18-6"
    for text in ("L18H6", "l18h6", "18-6", "18.6", " 18:6 "):
        assert Head.parse(text) == Head(18, 6)


def test_parse_heads_keeps_order_and_refuses_duplicates():
    assert parse_heads("L3H1, 0-2 L1H0") == (Head(3, 1), Head(0, 2), Head(1, 0))
    assert parse_heads([(2, 1), "L0H0"]) == (Head(2, 1), Head(0, 0))
    with pytest.raises(ValueError, match="repeats L3H1"):
        parse_heads("L3H1,3-1")
    with pytest.raises(ValueError, match="cannot parse head 'H3'"):
        parse_heads("H3")


def test_head_outside_the_model_is_a_clear_error():
    shape = HeadShape(n_layers=30, n_heads=9, n_kv_heads=3)
    assert parse_heads("L29H8", shape) == (Head(29, 8),)
    with pytest.raises(ValueError, match="L30H0 is outside the model.*layers 0..29"):
        parse_heads("L30H0", shape)
    with pytest.raises(ValueError, match="query heads 0..8"):
        parse_heads("L0H9", shape)


@pytest.mark.parametrize(
    ("n_heads", "n_kv", "expected"),
    [(4, 4, [0, 1, 2, 3]), (4, 2, [0, 0, 1, 1]), (4, 1, [0, 0, 0, 0]),
     (9, 3, [0, 0, 0, 1, 1, 1, 2, 2, 2])],
)
def test_kv_head_map_follows_hf_repeat_kv(n_heads, n_kv, expected):
    shape = HeadShape(2, n_heads, n_kv)
    assert [shape.kv_head(Head(0, h)) for h in range(n_heads)] == expected
    assert shape.group_size == n_heads // n_kv


def test_head_shape_rejects_impossible_geometry():
    with pytest.raises(ValueError, match="not a multiple"):
        HeadShape(2, 4, 3)


def test_head_shape_of_a_loaded_model(tiny_gqa):
    shape = HeadShape.of(tiny_gqa)
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads) == (2, 4, 2)
    assert len(shape.all_heads()) == 8


def test_kv_groups_of_a_head_set_are_whole_and_inside_only_when_every_member_is_chosen():
    shape = HeadShape(30, 9, 3)  # SmolLM2-135M: 3 query heads per KV head
    chosen = parse_heads("L18H7,L17H3,L18H6,L18H8,L17H5,L23H2")
    assert shape.kv_group(Head(18, 7)) == list(parse_heads("L18H6,L18H7,L18H8"))
    assert shape.kv_group_heads(chosen) == list(
        parse_heads("L17H3,L17H4,L17H5,L18H6,L18H7,L18H8,L23H0,L23H1,L23H2")
    )
    assert shape.kv_group_heads(chosen, inside=True) == list(parse_heads("L18H6,L18H7,L18H8"))
    assert shape.kv_group_heads(chosen[:2], inside=True) == []
    mha = HeadShape(30, 9, 9)  # each head its own group: both are the heads themselves
    assert mha.kv_group_heads(chosen) == mha.kv_group_heads(chosen, inside=True) == sorted(chosen)

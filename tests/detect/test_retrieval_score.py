"""Oracle tests of the Wu retrieval score: hand-made copy streams, then planted attention and
planted greedy output on tiny MHA/GQA/MQA models, then a teacher-forced full-pattern reference."""

import pytest
import torch
from planting import Step, forced_output, planted_attention

from mechinterp.detect import NoInstancePassedError, copy_score, retrieval_scores
from mechinterp.detect.retrieval import needle_mask
from mechinterp.tasks.prompt import Prompt

# ---------------------------------------------------------------- the pure copy counter

PROMPT = torch.tensor([5, 6, 7, 8, 9, 10, 11])  # needle = positions 2..4 (tokens 7, 8, 9)
NEEDLE = torch.tensor([False, False, True, True, True, False, False])


def stream(*positions_per_step):
    """argmax[step, layer=0, head] from per-step tuples of positions (one per head)."""
    return torch.tensor(positions_per_step)[:, None, :]


def test_head_attending_to_each_copied_needle_token_scores_one():
    score = copy_score(stream((2,), (3,), (4,)), torch.tensor([7, 8, 9]), PROMPT, NEEDLE)
    assert score.tolist() == [[1.0]]


def test_head_that_never_lands_on_the_needle_scores_zero():
    score = copy_score(stream((0,), (5,), (6,)), torch.tensor([7, 8, 9]), PROMPT, NEEDLE)
    assert score.tolist() == [[0.0]]


def test_landing_on_the_needle_with_a_different_token_is_not_a_copy():
    # step 0 generates 7 but the head looks at position 3 (token 8)
    score = copy_score(stream((3,), (3,)), torch.tensor([7, 8]), PROMPT, NEEDLE)
    assert score.tolist() == [[pytest.approx(1 / 3)]]


def test_repeated_token_counts_once_under_set_and_every_step_under_per_step():
    argmax = stream((2,), (2,), (3,), (2,))
    generated = torch.tensor([7, 7, 8, 7])
    assert copy_score(argmax, generated, PROMPT, NEEDLE, convention="set").item() == (
        pytest.approx(2 / 3)
    )
    assert copy_score(argmax, generated, PROMPT, NEEDLE, convention="per_step").item() == (
        pytest.approx(4 / 3)
    )


def test_positions_outside_the_prompt_never_copy():
    # a generated position (7) or a pad (-1) cannot be a needle copy even if ids collide
    score = copy_score(stream((7,), (-1,)), torch.tensor([5, 11]), PROMPT, NEEDLE)
    assert score.item() == 0.0


def test_heads_are_scored_independently():
    score = copy_score(stream((2, 0), (3, 3)), torch.tensor([7, 8]), PROMPT, NEEDLE)
    assert score[0].tolist() == [pytest.approx(2 / 3), pytest.approx(1 / 3)]


def test_needle_span_outside_the_prompt_is_refused():
    bad = Prompt("x", "", (1, 2, 3), {"needle": ((2, 5),)})
    with pytest.raises(ValueError, match=r"outside its 3 tokens"):
        needle_mask(bad)
    with pytest.raises(ValueError, match="no 'needle' span"):
        needle_mask(Prompt("y", "", (1, 2, 3), {}))


# ---------------------------------------------------------------- planted on tiny models

LETTERS = "qwertyuiopasdfghjklzxcvbnm"


def planted_prompts(model, specs, alphabet=LETTERS):
    """Prompts of random letters with a needle word; specs = [(n_tokens, needle_start, word)]."""
    tok = model.tokenizer
    gen = torch.Generator().manual_seed(0)
    prompts = []
    for i, (n, start, word) in enumerate(specs):
        fill = [alphabet[j] for j in torch.randint(len(alphabet), (n,), generator=gen)]
        fill[start : start + len(word)] = list(word)
        ids = tuple(tok.convert_tokens_to_ids(fill))
        prompts.append(
            Prompt(f"p{i}", "".join(fill), ids, {"needle": ((start, start + len(word)),)})
        )
    return prompts


def run_planted(model, prompts, outputs, plants, **kw):
    step = Step()
    eos = model.tokenizer.eos_token_id
    hooks = [planted_attention(step, *p) for p in plants] + [forced_output(step, outputs, eos)]
    answers = [[model.tokenizer.decode(o)] for o in outputs]
    with model.hooks(fwd_hooks=hooks):
        return retrieval_scores(
            model, prompts, answers, max_new_tokens=max(map(len, outputs)) + 1, **kw
        )


def test_planted_copy_head_scores_one_and_others_follow_their_plant(tiny):
    """Two prompts of different lengths in one left-padded batch: head (1, 0) always looks at the
    needle token being generated, head (1, 2) at the first prompt token, head (0, 1) at the needle
    token after the one generated. Only the first copies; the KV sibling of (1, 0) is untouched."""
    specs = [(40, 10, "qwerty"), (55, 30, "zxcvbn")]
    prompts = planted_prompts(tiny, specs)
    outputs = [
        list(p.input_ids[s : s + len(w)]) for p, (_, s, w) in zip(prompts, specs, strict=True)
    ]
    width = max(p.n_tokens for p in prompts)
    offset = [width - p.n_tokens for p in prompts]

    def needle_token(r, step):
        return offset[r] + specs[r][1] + min(step, len(specs[r][2]) - 1)

    plants = [
        (1, 0, needle_token),
        (1, 2, lambda r, step: offset[r]),
        (0, 1, lambda r, step: needle_token(r, step + 1) if step < 5 else offset[r]),
    ]
    d = run_planted(tiny, prompts, outputs, plants, batch_size=2)
    assert d.n_counted == 2
    assert d.instances["prediction"].tolist() == ["qwerty", "zxcvbn"]
    assert d.per_instance[:, 1, 0].tolist() == [1.0, 1.0]
    assert d.per_instance[:, 1, 2].tolist() == [0.0, 0.0]
    assert d.per_instance[:, 0, 1].tolist() == [0.0, 0.0]
    assert d.scores[1, 0].item() == 1.0 and d.frequency[1, 0].item() == 1.0


def test_planted_repeat_follows_the_convention(tiny_gqa):
    """The answer repeats the needle's first token; the head looks at it both times."""
    prompts = planted_prompts(tiny_gqa, [(30, 5, "asdf")])
    needle = list(prompts[0].input_ids[5:9])
    outputs = [needle + needle[:1]]  # "asdfa"
    plants = [(1, 3, lambda r, step: 5 + (step if step < 4 else 0))]
    by = {
        c: run_planted(tiny_gqa, prompts, outputs, plants, convention=c).scores[1, 3].item()
        for c in ("set", "per_step")
    }
    assert by == {"set": 1.0, "per_step": pytest.approx(5 / 4)}


def test_gate_drops_wrong_answers_and_refuses_when_none_pass(tiny_gqa):
    prompts = planted_prompts(tiny_gqa, [(30, 5, "asdf"), (30, 9, "ghjk")])
    outputs = [list(prompts[0].input_ids[5:9]), list(prompts[1].input_ids[5:9])]  # 2nd is wrong
    step = Step()
    hooks = [forced_output(step, outputs, tiny_gqa.tokenizer.eos_token_id)]
    with tiny_gqa.hooks(fwd_hooks=hooks):
        d = retrieval_scores(tiny_gqa, prompts, [["asdf"], ["ghjk"]], max_new_tokens=5)
    assert d.counted.tolist() == [True, False]
    assert d.instances["rouge1_recall"].tolist() == [1.0, 0.0]
    step.value = 0
    with tiny_gqa.hooks(fwd_hooks=hooks), pytest.raises(NoInstancePassedError, match="50% of 2"):
        retrieval_scores(tiny_gqa, prompts, [["asdf"], ["ghjk"]], max_new_tokens=5, gate=1.0)


# ---------------------------------------------------------------- against full patterns


def test_scores_equal_a_teacher_forced_full_pattern_reference(tiny):
    """Unplanted attention, every head: the argmax kept inside hooks during batched cached
    decoding gives the same scores as argmaxes of full patterns from one teacher-forced forward.
    (The output is forced to prompt letters from a 3-letter alphabet so that copies happen.)"""
    prompts = planted_prompts(tiny, [(33, 0, ""), (47, 0, "")], alphabet="abc")
    prompts = [
        Prompt(p.example_id, p.text, p.input_ids, {"needle": ((3, p.n_tokens - 2),)})
        for p in prompts
    ]
    outputs = [list(tiny.tokenizer.convert_tokens_to_ids(list(w))) for w in ("abcab", "ccbab")]
    with tiny.hooks(fwd_hooks=[forced_output(Step(), outputs, tiny.tokenizer.eos_token_id)]):
        d = retrieval_scores(
            tiny, prompts, [["x"], ["x"]], gate=None, convention="per_step", max_new_tokens=8
        )
    assert bool((d.per_instance > 0).any()), "no copies at all: the comparison would be vacuous"
    for i, p in enumerate(prompts):
        n = p.n_tokens
        gen = list(d.instances["generated_ids"][i])
        assert len(gen) == d.instances["n_generated"][i] > 0
        ids = torch.tensor([list(p.input_ids) + gen])
        _, cache = tiny.run_with_cache(ids)
        argmax = torch.stack(
            [
                cache[f"blocks.{layer}.attn.hook_pattern"][0, :, n - 1 : n - 1 + len(gen), :n]
                .argmax(-1)
                .T
                for layer in range(tiny.cfg.n_layers)
            ],
            1,
        )  # [step, layer, head]
        ref = copy_score(
            argmax,
            torch.tensor(gen),
            torch.tensor(p.input_ids),
            needle_mask(p),
            convention="per_step",
        )
        torch.testing.assert_close(d.per_instance[i], ref)

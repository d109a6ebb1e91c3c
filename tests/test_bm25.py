"""BM25 baseline: a standard English analyzer (stopwords, Snowball stemming) and no error for token-less input."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.baselines import BM25Ranker

TITLES = ["Nike Men Blue Tshirt", "Puma Women Black Handbag", "Red running shoes", "Blue denim jeans"]


def test_plural_query_matches_singular_title() -> None:
    stemmed, plain = BM25Ranker(TITLES), BM25Ranker(TITLES, stem=None)
    assert stemmed.query_tokens("blue tshirts") == ["blue", "tshirt"]
    s = stemmed.corpus_scores("blue tshirts")
    assert int(np.argmax(s)) == 0 and s[0] > s[3] > 0  # both blue; only item 0 is a t-shirt
    # unstemmed: "tshirts" matches nothing, the query scores as "blue" alone and the t-shirt does not win
    np.testing.assert_allclose(plain.corpus_scores("blue tshirts"), plain.corpus_scores("blue"))
    assert plain.corpus_scores("blue tshirts")[0] <= plain.corpus_scores("blue tshirts")[3]


@pytest.mark.parametrize("query", ["the", "!!!", "\U0001f600", "", "   "])
def test_query_without_searchable_words_ties_every_item(query: str) -> None:
    ranker = BM25Ranker(TITLES)
    assert ranker.query_tokens(query) == []
    np.testing.assert_array_equal(ranker.corpus_scores(query), np.zeros(len(TITLES), np.float32))
    assert ranker.score([query], np.array([[0, 2]])).shape == (1, 2)


def test_catalog_without_searchable_words_scores_zero() -> None:
    ranker = BM25Ranker(["\U0001f600", "!!!", "the"])
    np.testing.assert_array_equal(ranker.corpus_scores("red shoes"), np.zeros(3, np.float32))

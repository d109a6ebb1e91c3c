"""Non-learned rankers to compare the head against: BM25 (the ``bm25s`` library) and query-title cosine."""

from __future__ import annotations

import bm25s
import numpy as np

STEMMER_LANGUAGE = "english"  # Snowball (Porter2) through PyStemmer, as bm25s documents


def _stemmer(language: str | None) -> object | None:
    if language is None:
        return None
    import Stemmer  # PyStemmer

    return Stemmer.Stemmer(language)


class BM25Ranker:
    """BM25 over item title + description with a standard English analyzer: lower-casing, ``bm25s``'s English
    stopwords and Snowball stemming (``blue tshirts`` matches ``Blue Tshirt``) -- the BM25 a practitioner sets up.
    ``stem=None`` gives the unstemmed variant. A query with no searchable word (``the``, ``!!!``, an emoji), or a
    catalog whose texts have none, scores every item 0: a tie, never an error."""

    name = "bm25"

    def __init__(self, item_texts: list[str], stem: str | None = STEMMER_LANGUAGE) -> None:
        self.stemmer = _stemmer(stem)
        tokens = bm25s.tokenize(item_texts, stopwords="en", stemmer=self.stemmer, show_progress=False)
        self.num_items = len(item_texts)
        self.retriever: bm25s.BM25 | None = None
        if tokens.vocab:
            self.retriever = bm25s.BM25()
            self.retriever.index(tokens, show_progress=False)
        self._cache: dict[str, np.ndarray] = {}

    def query_tokens(self, query: str) -> list[str]:
        """The analyzed query (lower-cased, stopwords removed, stemmed)."""
        out = bm25s.tokenize([query], stopwords="en", stemmer=self.stemmer, show_progress=False, return_ids=False)
        return list(out[0])

    def corpus_scores(self, query: str) -> np.ndarray:
        """BM25 score of every catalog row for ``query`` [num_items]."""
        if query not in self._cache:
            tokens = self.query_tokens(query)
            if self.retriever is None or not tokens:
                self._cache[query] = np.zeros(self.num_items, np.float32)
            else:
                self._cache[query] = np.asarray(self.retriever.get_scores(tokens), dtype=np.float32)
        return self._cache[query]

    def score(self, queries: list[str], items: np.ndarray) -> np.ndarray:
        """Scores [N, S] for N queries and their candidate rows ``items`` [N, S]."""
        return np.stack([self.corpus_scores(q)[row] for q, row in zip(queries, items, strict=True)])


class CosineRanker:
    """Cosine between the query embedding and the item text embedding (both MiniLM, L2-normalised)."""

    name = "cosine"

    def __init__(self, item_text_emb: np.ndarray) -> None:
        norms = np.linalg.norm(item_text_emb, axis=1, keepdims=True)
        self.items = item_text_emb / np.maximum(norms, 1e-12)

    def score(self, query_emb: np.ndarray, items: np.ndarray) -> np.ndarray:
        """query_emb [N, D], items [N, S] rows -> [N, S]."""
        q = query_emb / np.maximum(np.linalg.norm(query_emb, axis=1, keepdims=True), 1e-12)
        return np.einsum("nd,nsd->ns", q, self.items[items])

"""Non-learned rankers to compare the head against: BM25 (the ``bm25s`` library) and query-title cosine."""

from __future__ import annotations

import bm25s
import numpy as np


class BM25Ranker:
    """BM25 over item title + description (Lucene variant as implemented by ``bm25s``)."""

    name = "bm25"

    def __init__(self, item_texts: list[str]) -> None:
        tokens = bm25s.tokenize(item_texts, stopwords="en", show_progress=False)
        self.retriever = bm25s.BM25()
        self.retriever.index(tokens, show_progress=False)
        self._cache: dict[str, np.ndarray] = {}

    def corpus_scores(self, query: str) -> np.ndarray:
        """BM25 score of every catalog row for ``query`` [num_items]."""
        if query not in self._cache:
            q = bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)[0]
            self._cache[query] = np.asarray(self.retriever.get_scores(q), dtype=np.float32)
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

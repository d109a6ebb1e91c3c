"""Query-intent fields derived from titles, for catalogs without category / brand / colour columns.

The simulator builds intents from a catalog's ``category`` and attribute columns (:mod:`simulations.market_index`).
A shop's catalog may hold only ``item_id,title``; :func:`fill_missing_intents` then derives, from the titles alone,
each field that *no* item has:

=============  ===================================================================================================
field          derived as
=============  ===================================================================================================
``category``   spherical k-means clusters of the title texts (TF-IDF vectors, or MiniLM text embeddings through the
               feature store's content-hash cache), ``k`` given or chosen by the best silhouette on a sample; each
               cluster is named by its most salient title terms (class-based TF-IDF: a term frequent in the
               cluster and rare in the others; a second term is added when two clusters share the first)
``brand``      the leading title word(s) when they start at least ``brand_min_items`` titles and, wherever the
               word occurs, mostly lead (``Nike Men Blue Jersey`` -> ``nike``; ``Allen Solly Shirt`` -> ``allen
               solly`` when ``solly`` nearly always follows ``allen``); the ``brand_values`` most common kept
``color``      the first colour phrase of the title found in :data:`simulations.market_vocab.TITLE_COLORS`
``keyword``    (an extra attribute) the item's most salient title term in its cluster that is not the category
               name, brand or colour (``men``, ``printed``, ``analog``, ...), kept for the ``keyword_values`` most
               common terms
=============  ===================================================================================================

Everything is deterministic by seed (k-means++ seeding and restarts use ``numpy.random.default_rng(seed)``), and
:func:`fill_missing_intents` returns the record that ``meta.json`` keeps under ``derived_intents``: the fields,
method, k, seed, encoder version and each category's name, size and top terms.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import scipy.sparse as sp

from shared_model.schema import Catalog
from simulations.market_index import norm, tokens
from simulations.market_vocab import TITLE_COLORS

__all__ = [
    "KEYWORD_ATTRIBUTE",
    "METHODS",
    "TitleIntentSettings",
    "candidate_ks",
    "choose_num_categories",
    "derive_brands",
    "derive_colors",
    "fill_missing_intents",
    "missing_intent_fields",
    "spherical_kmeans",
    "tfidf_vectors",
]

log = logging.getLogger(__name__)

METHODS = ("embedding", "tfidf")
KEYWORD_ATTRIBUTE = "keyword"
_BRAND_WORDS = 4  # longest brand, in words
_JOINERS = frozenset({"and", "&", "of", "de", "by", "the", "n"})
_NUMERIC = re.compile(r"^\d[\da-z]*$")  # 2015, 3xl, 500ml: never names or keywords


@dataclass(frozen=True)
class TitleIntentSettings:
    """How intents are derived from titles.

    Attributes
    ----------
    method : str
        ``tfidf`` (title-token TF-IDF; no encoder; the default: on the 34,500 real fashion titles it agreed better
        with the held-back article types, ARI 0.41 against 0.36, in 5 s against 5 min on 2 cores) or
        ``embedding`` (MiniLM text embeddings through the feature cache, which training then reuses).
    num_categories : int or None
        Clusters ``k``; None = :func:`choose_num_categories` (best silhouette among :func:`candidate_ks`).
    max_categories : int
        Cap on the automatic ``k``.
    restarts : int
        k-means runs from different k-means++ seeds; the one with the highest within-cluster similarity is kept.
    max_iter : int
        Lloyd iterations per run at most.
    brand_min_items : int
        A leading word (or phrase) is a brand when it starts at least this many titles...
    brand_lead_share : float
        ...and at least this share of the titles that contain it start with it.
    brand_values : int
        Only the this many most common brands are kept (others: no value), so that brand stays an intent
        attribute (the simulator leaves out attributes with more than ``MarketConfig.max_attr_values`` values).
    keyword_values : int
        The ``keyword`` attribute keeps this many of the most common terms (others: no value).
    seed : int
        Seed of the k-means++ draws.
    """

    method: str = "tfidf"
    num_categories: int | None = None
    max_categories: int = 60
    restarts: int = 3
    max_iter: int = 100
    brand_min_items: int = 3
    brand_lead_share: float = 0.8
    brand_values: int = 150
    keyword_values: int = 150
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown title-intent method {self.method!r}; choose one of {METHODS}")
        if self.num_categories is not None and self.num_categories < 1:
            raise ValueError(f"num_categories must be >= 1, got {self.num_categories}")
        if self.restarts < 1 or self.max_iter < 1 or self.max_categories < 1:
            raise ValueError("restarts, max_iter and max_categories must be >= 1")


def missing_intent_fields(catalog: Catalog) -> list[str]:
    """The intent fields (``category``, ``brand``, ``color``) that no item of ``catalog`` has a value for."""
    return [f for f in ("category", "brand", "color") if not any(norm(it.attribute(f)) for it in catalog)]


def candidate_ks(n: int, cap: int = 60) -> list[int]:
    """Cluster counts tried for ``n`` items: 2, 3, ... growing by about a quarter, up to ``min(cap, n // 10)``."""
    top = max(2, min(cap, n // 10))
    ks = {2}
    k = 2.0
    while k < top:
        k = max(k + 1, k * 1.25)
        ks.add(min(round(k), top))
    return sorted(ks)


def _silhouette(x: np.ndarray | sp.csr_matrix, labels: np.ndarray) -> float:
    """Mean silhouette of ``labels`` over rows ``x [N, D]`` (L2-normalised) with cosine distance."""
    s = x @ x.T
    d = 1.0 - np.asarray(s.toarray() if sp.issparse(s) else s, dtype=np.float64)
    n, k = len(labels), int(labels.max()) + 1
    member = np.zeros((n, k))
    member[np.arange(n), labels] = 1.0
    sums, counts = d @ member, member.sum(axis=0)
    own = sums[np.arange(n), labels] / np.maximum(counts[labels] - 1.0, 1.0)
    other = np.where(member > 0, np.inf, sums / np.maximum(counts, 1.0)).min(axis=1) if k > 1 else own
    score = np.where(counts[labels] > 1, (other - own) / np.maximum(np.maximum(own, other), 1e-12), 0.0)
    return float(score.mean())


def choose_num_categories(x: np.ndarray | sp.csr_matrix, cap: int = 60, seed: int = 0,
                          sample: int = 2000) -> tuple[int, dict[int, float]]:
    """The cluster count (among :func:`candidate_ks`) with the best mean silhouette on a seeded sample of rows.

    Returns
    -------
    k : int
    scores : dict of int to float
        Silhouette per candidate.
    """
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n, sample), replace=False))
    xs = x[rows]
    scores: dict[int, float] = {}
    for k in candidate_ks(n, cap):
        if k >= len(rows):
            break
        scores[k] = round(_silhouette(xs, spherical_kmeans(xs, k, seed=seed, restarts=1)), 4)
    if not scores:
        return max(1, min(n, 2)), scores
    return max(scores, key=lambda k: (scores[k], -k)), scores


# ------------------------------------------------------------------------------------------- attributes


def _color_phrases() -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    pairs = {tuple(k.split()): v for k, v in TITLE_COLORS.items() if len(k.split()) == 2}
    single = {k: v for k, v in TITLE_COLORS.items() if len(k.split()) == 1}
    return pairs, single  # type: ignore[return-value]


def derive_colors(titles: list[list[str]]) -> list[str]:
    """Per title (as word tokens): the first colour phrase in :data:`TITLE_COLORS` (two-word phrases first), or ''."""
    pairs, single = _color_phrases()
    out: list[str] = []
    for toks in titles:
        found = ""
        for i, t in enumerate(toks):
            if i + 1 < len(toks) and (t, toks[i + 1]) in pairs:
                found = pairs[(t, toks[i + 1])]
                break
            if t in single:
                found = single[t]
                break
        out.append(found)
    return out


def derive_brands(titles: list[list[str]], min_items: int = 3, lead_share: float = 0.8,
                  exclude: frozenset[str] = frozenset()) -> list[str]:
    """Per title (raw lower-case words): its brand, the leading word(s) when they behave like a brand, or ''.

    A first word is a brand when it starts at least ``min_items`` titles, at least ``lead_share`` of the titles
    containing it start with it, and it is neither a number nor in ``exclude`` (colour words). The brand grows by
    the next word while that word follows in at least ``lead_share`` of the brand's titles and at least
    ``lead_share`` of the titles containing that word have it there (four words at most; a joiner such as
    ``and`` is judged with the word after it): ``allen solly``, ``gini and jony``, not ``catwalk women``.
    """
    first = Counter(t[0] for t in titles if len(t) > 1)  # a brand never is the whole title
    anywhere: Counter[str] = Counter()
    for t in titles:
        anywhere.update(set(t))
    brands = {w for w, c in first.items()
              if c >= min_items and c >= lead_share * anywhere[w] and w not in exclude and not _NUMERIC.match(w)}
    prefix: Counter[tuple[str, ...]] = Counter()
    for t in titles:
        if t and t[0] in brands:
            for k in range(1, _BRAND_WORDS + 1):
                if len(t) > k:
                    prefix[tuple(t[:k])] += 1
    out: list[str] = []
    for t in titles:
        if len(t) < 2 or t[0] not in brands:
            out.append("")
            continue
        name: tuple[str, ...] = (t[0],)
        cand: tuple[str, ...] = (t[0],)
        for k in range(2, _BRAND_WORDS + 1):
            prev, cand = cand, tuple(t[:k])
            w = cand[-1]
            joins = w in _JOINERS and k < _BRAND_WORDS  # "gini and jony": judged with the next word
            if not (len(t) > k and prefix[cand] >= lead_share * prefix[prev] and w not in exclude
                    and not _NUMERIC.match(w) and (joins or prefix[cand] >= lead_share * anywhere[w])):
                break
            if not joins:
                name = cand
        out.append(" ".join(name))
    return out


def _raw_words(title: str) -> list[str]:
    """Lower-case words of a title with their punctuation stripped (brands keep short words: ``H&M`` -> ``h&m``)."""
    return [w for w in (x.strip(".,;:!?()[]{}\"'|/-") for x in title.lower().split()) if w]


# --------------------------------------------------------------------------------------------- vectors


def tfidf_vectors(token_lists: list[list[str]], min_df: int = 2) -> sp.csr_matrix:
    """L2-normalised TF-IDF rows ``[N, V]`` of the token lists (binary term frequency, smooth IDF)."""
    df: Counter[str] = Counter()
    for toks in token_lists:
        df.update(set(toks))
    vocab = {t: i for i, t in enumerate(sorted(t for t, c in df.items() if c >= min_df))}
    rows, cols = [], []
    for r, toks in enumerate(token_lists):
        for t in set(toks):
            j = vocab.get(t)
            if j is not None:
                rows.append(r)
                cols.append(j)
    n = len(token_lists)
    idf = np.log((1.0 + n) / (1.0 + np.array([df[t] for t in sorted(vocab, key=vocab.__getitem__)]))) + 1.0
    x = sp.csr_matrix((idf[cols] if cols else np.zeros(0), (rows, cols)), shape=(n, max(len(vocab), 1)),
                      dtype=np.float64)
    x.sort_indices()
    lens = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    return sp.csr_matrix(sp.diags(1.0 / np.where(lens > 0, lens, 1.0)) @ x)


def _dot(x: np.ndarray | sp.csr_matrix, c: np.ndarray) -> np.ndarray:
    """Similarities ``[N, K]`` of rows ``x [N, D]`` to centres ``c [K, D]`` (in ``x``'s precision)."""
    return np.asarray(x @ c.T.astype(x.dtype, copy=False))


def _centres(x: np.ndarray | sp.csr_matrix, labels: np.ndarray, k: int) -> np.ndarray:
    """Unit-length mean directions ``[K, D]`` of each cluster (zero for an empty one)."""
    n = x.shape[0]
    member = sp.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))
    c = member @ x
    c = c.toarray() if sp.issparse(c) else np.asarray(c)
    lens = np.linalg.norm(c, axis=1, keepdims=True)
    return np.asarray(c / np.where(lens > 0, lens, 1.0), dtype=np.float64)


def _kmeanspp(x: np.ndarray | sp.csr_matrix, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on cosine distance: ``[K, D]`` starting centres (rows of ``x``)."""
    n = x.shape[0]
    picks = [int(rng.integers(n))]
    best = 1.0 - _dot(x, _row(x, picks[0]))[:, 0]
    for _ in range(1, k):
        w = np.clip(best, 0.0, None)
        total = w.sum()
        j = int(rng.choice(n, p=w / total)) if total > 0 else int(rng.integers(n))
        picks.append(j)
        best = np.minimum(best, 1.0 - _dot(x, _row(x, j))[:, 0])
    return np.concatenate([_row(x, j) for j in picks])


def _row(x: np.ndarray | sp.csr_matrix, i: int) -> np.ndarray:
    r = x[i]
    return np.asarray(r.toarray() if sp.issparse(r) else r, dtype=np.float64).reshape(1, -1)


def spherical_kmeans(x: np.ndarray | sp.csr_matrix, k: int, seed: int = 0, restarts: int = 3,
                     max_iter: int = 100) -> np.ndarray:
    """Cluster L2-normalised rows ``x [N, D]`` (dense or CSR) into ``k`` groups by cosine similarity.

    Lloyd iterations from k-means++ seeds, ``restarts`` times; the run with the highest total similarity to its
    centres is kept. An emptied cluster is re-seeded with the row least similar to its centre. Labels are
    renumbered by cluster size (largest first; ties by the first row), so equal inputs give equal labels.

    Returns
    -------
    ndarray of int [N]
        Cluster of each row, in ``0..k-1``.
    """
    n = x.shape[0]
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    best_labels, best_score = np.zeros(n, dtype=np.int64), -np.inf
    for _ in range(restarts):
        c = _kmeanspp(x, k, rng)
        labels = np.full(n, -1, dtype=np.int64)
        for _ in range(max_iter):
            sims = _dot(x, c)
            new = np.argmax(sims, axis=1)
            counts = np.bincount(new, minlength=k)
            for e in np.flatnonzero(counts == 0):  # re-seed empty clusters (deterministic)
                far = int(np.argmin(sims[np.arange(n), new]))
                new[far] = e
                sims[far, e] = np.inf
            if np.array_equal(new, labels):
                break
            labels = new
            c = _centres(x, labels, k)
        score = float(_dot(x, c)[np.arange(n), labels].sum())
        if score > best_score + 1e-9:
            best_labels, best_score = labels, score
    sizes = np.bincount(best_labels, minlength=k)
    first = np.full(k, n)
    np.minimum.at(first, best_labels, np.arange(n))
    order = np.lexsort((first, -sizes))
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    return remap[best_labels]


def _embed(texts: list[str], data_dir: str | os.PathLike[str] | None, progress: bool) -> tuple[np.ndarray, str]:
    """MiniLM text embeddings ``[N, 384]`` through the text cache of data folder ``data_dir`` (default: the
    current folder's), and the encoder version."""
    from shared_model.embedding_cache import feature_cache_dir
    from shared_model.encoders import TextEncoder
    from shared_model.features import encode_queries

    vecs = encode_queries(texts, feature_cache_dir(data_dir if data_dir is not None else "."), progress=progress)
    return np.asarray(vecs, dtype=np.float32), TextEncoder.version(64)


# --------------------------------------------------------------------------------------------- naming


def _leading_words(token_lists: list[list[str]], share: float = 0.8, min_items: int = 3) -> set[str]:
    """Words that, wherever they occur, mostly open the title (brand-like even where no brand was derived)."""
    first = Counter(t[0] for t in token_lists if t)
    anywhere: Counter[str] = Counter()
    for t in token_lists:
        anywhere.update(set(t))
    return {w for w, c in first.items() if c >= min_items and c >= share * anywhere[w]}


def _class_tfidf(token_lists: list[list[str]], labels: np.ndarray, k: int) -> tuple[np.ndarray, list[str]]:
    """Class-based TF-IDF ``[K, V]`` (``tf[c, t] * log(1 + A / f[t])``; ``A`` = mean tokens per class) and terms."""
    vocab: dict[str, int] = {}
    rows, cols = [], []
    for r, toks in enumerate(token_lists):
        for t in dict.fromkeys(toks):
            rows.append(int(labels[r]))
            cols.append(vocab.setdefault(t, len(vocab)))
    terms = sorted(vocab, key=vocab.__getitem__)
    tf = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(k, max(len(vocab), 1))).toarray()
    f = tf.sum(axis=0)
    a = tf.sum() / max(k, 1)
    return tf * np.log1p(a / np.maximum(f, 1.0)), terms


def _name_clusters(weights: np.ndarray, terms: list[str], banned: set[str], top: int = 8) -> tuple[list[str],
                                                                                               list[list[str]]]:
    """A distinct name per cluster (its top eligible term; a second term when another cluster has it) and
    each cluster's ``top`` terms."""
    ok = np.array([t not in banned and len(t) > 2 and not _NUMERIC.match(t) for t in terms], dtype=bool)
    tops: list[list[str]] = []
    for c in range(weights.shape[0]):
        w = np.where(ok, weights[c], -np.inf)
        order = np.lexsort((np.arange(len(terms)), -w))
        tops.append([terms[j] for j in order[:top] if np.isfinite(w[j]) and w[j] > 0])
    tops = [_drop_variants(t) for t in tops]
    first = Counter(t[0] for t in tops if t)
    names: list[str] = []
    used: set[str] = set()
    for c, t in enumerate(tops):
        if not t:
            name = f"group {c + 1}"
        elif first[t[0]] == 1:
            name = t[0]
        else:
            name = next((f"{x} {t[0]}" for x in t[1:] if f"{x} {t[0]}" not in used), f"{t[0]} {c + 1}")
        if name in used:
            name = f"{name} {c + 1}"
        used.add(name)
        names.append(name)
    return names, tops


def _drop_variants(terms: list[str]) -> list[str]:
    """Terms without plural/singular variants of an earlier one (``shoes`` after ``shoe``)."""
    out: list[str] = []
    for t in terms:
        if not any(t.startswith(u) or u.startswith(t) for u in out):
            out.append(t)
    return out


def _keywords(token_lists: list[list[str]], labels: np.ndarray, weights: np.ndarray, terms: list[str],
              banned_per_item: list[set[str]], keep: int) -> list[str]:
    """Per item: its title term of highest class-TF-IDF weight in its cluster, not banned; the ``keep`` most
    common such terms are kept (others: '')."""
    pos = {t: j for j, t in enumerate(terms)}
    chosen: list[str] = []
    for r, toks in enumerate(token_lists):
        best, bw = "", 0.0
        for t in dict.fromkeys(toks):
            if t in banned_per_item[r] or _NUMERIC.match(t):
                continue
            w = float(weights[labels[r], pos[t]])
            if w > bw:
                best, bw = t, w
        chosen.append(best)
    return _most_common(chosen, keep)


def _most_common(values: list[str], keep: int) -> list[str]:
    """``values`` with only the ``keep`` most common non-empty ones kept (ties by value), others ''."""
    counts = Counter(v for v in values if v)
    kept = {t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:keep]}
    return [v if v in kept else "" for v in values]


# ----------------------------------------------------------------------------------------------- entry


def fill_missing_intents(
    catalog: Catalog, settings: TitleIntentSettings | None = None, seed: int | None = None,
    data_dir: str | os.PathLike[str] | None = None, progress: bool = False,
) -> dict[str, Any] | None:
    """Derive, from the titles, the intent fields no item of ``catalog`` has, and fill them in (in place).

    Parameters
    ----------
    catalog : Catalog
        Changed in place: ``category``, ``brand``, ``color`` of every item for the derived fields, and the extra
        attribute ``keyword`` when ``category`` is derived (unless the catalog already has such a column).
    settings : TitleIntentSettings, optional
        Method, ``k``, seed, thresholds (defaults: :class:`TitleIntentSettings`).
    seed : int, optional
        Overrides ``settings.seed`` (the simulator passes its own seed).
    data_dir : str or PathLike, optional
        The data folder being written (an existing folder): with ``method="embedding"`` the texts are embedded
        through its feature cache (:func:`shared_model.embedding_cache.feature_cache_dir`), so training reuses
        the embeddings.
    progress : bool
        Show the encoder's progress bar.

    Returns
    -------
    dict or None
        None when the catalog has every field; else the record for ``meta.json``: ``fields`` (derived),
        ``method``, ``k``, ``seed``, ``settings``, ``encoder`` (embedding method), ``seconds``, value counts and,
        for a derived category, ``categories`` (name, size, top terms per cluster).
    """
    s = settings or TitleIntentSettings()
    if seed is not None:
        s = replace(s, seed=int(seed))
    missing = missing_intent_fields(catalog)
    if not missing:
        return None
    t0 = time.perf_counter()
    items = catalog.items
    toks = [tokens(it.title) for it in items]
    raw = [_raw_words(it.title) for it in items]
    record: dict[str, Any] = {"fields": list(missing), "source": "title", "seed": s.seed, "settings": asdict(s)}
    colors = [norm(it.color) for it in items]
    if "color" in missing:
        colors = derive_colors(toks)
        for it, c in zip(items, colors, strict=True):
            it.color = c
        record["color"] = {"method": "title words in simulations.market_vocab.TITLE_COLORS",
                           "items_with_value": sum(1 for c in colors if c), "values": len(set(colors) - {""})}
    brands = [norm(it.brand) for it in items]
    if "brand" in missing:
        colour_words = frozenset(w for k in TITLE_COLORS for w in k.split())
        brands = _most_common(derive_brands(raw, s.brand_min_items, s.brand_lead_share, exclude=colour_words),
                              s.brand_values)
        for it, b in zip(items, brands, strict=True):
            it.brand = b
        record["brand"] = {"method": "leading title words", "items_with_value": sum(1 for b in brands if b),
                           "values": len(set(brands) - {""})}
    if "category" in missing:
        record.update(_derive_categories(catalog, toks, colors, brands, s, data_dir, progress))
        record["fields"] = [*missing, *record.pop("added_attributes", [])]
    record["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("derived %s from titles of %d items (%s) in %.1fs", "/".join(missing), len(items),
             record.get("method", "title words"), record["seconds"])
    return record


def _derive_categories(
    catalog: Catalog, toks: list[list[str]], colors: list[str], brands: list[str], s: TitleIntentSettings,
    data_dir: str | os.PathLike[str] | None, progress: bool,
) -> dict[str, Any]:
    """Cluster the titles, name the clusters, set ``category`` (and ``keyword``); the record's category part."""
    items = catalog.items
    n = len(items)
    out: dict[str, Any] = {"method": s.method}
    t0 = time.perf_counter()
    x: np.ndarray | sp.csr_matrix
    if s.method == "embedding":
        x, out["encoder"] = _embed([it.text() for it in items], data_dir, progress)
    else:
        x = tfidf_vectors(toks)
    t1 = time.perf_counter()
    if s.num_categories is not None:
        k = min(s.num_categories, n)
        out["k_selection"] = {"method": "given"}
    else:
        k, scores = choose_num_categories(x, s.max_categories, s.seed)
        out["k_selection"] = {"method": "best mean silhouette (cosine) on a sample", "sample": min(n, 2000),
                              "silhouette": {str(c): v for c, v in scores.items()}}
    out["k"] = k
    labels = spherical_kmeans(x, k, seed=s.seed, restarts=s.restarts, max_iter=s.max_iter)
    t2 = time.perf_counter()
    weights, terms = _class_tfidf(toks, labels, k)
    brand_words = {w for b in brands for w in b.split()} | _leading_words(toks)
    colour_words = {w for c in TITLE_COLORS for w in c.split()}
    names, tops = _name_clusters(weights, terms, brand_words | colour_words)
    for it, c in zip(items, labels, strict=True):
        it.category = names[c]
    sizes = np.bincount(labels, minlength=k)
    out["categories"] = [{"name": names[c], "size": int(sizes[c]), "top_terms": tops[c]} for c in range(k)]
    if not any(KEYWORD_ATTRIBUTE in it.attributes for it in items):
        banned = [set(names[labels[r]].split()) | set(brands[r].split()) | set(colors[r].split())
                  | colour_words for r in range(n)]
        kws = _keywords(toks, labels, weights, terms, banned, s.keyword_values)
        for it, kw in zip(items, kws, strict=True):
            it.attributes[KEYWORD_ATTRIBUTE] = kw
        out["added_attributes"] = [KEYWORD_ATTRIBUTE]
        out[KEYWORD_ATTRIBUTE] = {"method": "most salient class-TF-IDF title term, not category/brand/colour",
                                  "items_with_value": sum(1 for w in kws if w), "values": len(set(kws) - {""})}
    out["timings"] = {"vectors_s": round(t1 - t0, 2), "choose_k_and_cluster_s": round(t2 - t1, 2)}
    return out

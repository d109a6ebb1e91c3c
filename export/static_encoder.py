"""The static query encoder of a compact bundle (``fedrank export --query-encoder static``): a token-embedding
table distilled offline from the packaged text encoder (all-MiniLM-L6-v2), mapped into that encoder's
sentence-embedding space so that the head -- trained on MiniLM query embeddings -- accepts its output as it is.

The distillation is model2vec's recipe (Tulkens & van Dongen, model2vec 0.10, ``model2vec/distill``), written out
here because model2vec 0.10's distiller rebuilds the tokenizer (``skeletoken``), so its token ids would no longer
be those of the bundle's ``tokenizer.json``, and it needs ``huggingface-hub>=1``, which the pinned ``transformers``
excludes. Its three steps (1-3) are a few lines of numpy each; steps 4-5 map the table into the head's space:

1. **vocabulary pass**: every token id ``t`` of the tokenizer (``[PAD]`` and ``[unusedN]`` excepted: their rows
   stay zero) through the text encoder as the 3-token input ``[CLS] t [SEP]`` (model2vec's
   ``create_embeddings``, mean pooling; here the encoder's own output, i.e. mean-pooled and L2-normalised);
2. **PCA** to ``dim`` components (centred, eigendecomposition of the covariance; model2vec's ``apply_pca``);
3. **SIF weighting** from Zipf's law over the token ids' order (model2vec's ``compute_weights``, coefficient
   1e-4): row ``t`` times ``1e-4 / (1e-4 + p_t)``, ``p_t`` proportional to ``1 / (t + 2)``;
4. **alignment** (not in model2vec): ridge least squares from the static mean-pooled vectors of in-domain texts
   (the catalog's item texts, the training sessions' queries, and single vocabulary tokens) to the text
   encoder's embeddings of the same texts: ``projection [dim, 384]`` and ``bias [384]``. Mean pooling and the
   affine map commute, so this costs one small matrix product per query;
5. **tuning** (tokenlearn-style, not in model2vec): table, projection and bias trained together by Adam on the
   same pairs, loss ``1 - cosine`` to the encoder's embedding, from the step-4 solution. Only rows of tokens
   that occur in the fit texts move; zero rows stay zero.

Measured on the default marketplace (fused head, 2,000 held-out slates, torch NDCG@10; MiniLM 0.8405; cosine
to MiniLM on 1,500 held-out queries the fit never saw):

    table                                     cosine mean   NDCG@10 delta
    384-d token outputs, no PCA/SIF/alignment   0.694        -0.045
    384-d + SIF + alignment                     0.933        -0.011
    128-d PCA + SIF + alignment                 0.855        -0.057
    256-d PCA + SIF + alignment                 0.914        -0.017
    128-d + tuning, 10 epochs, lr 2e-3          0.953        -0.0029
    128-d + tuning, 30 epochs, lr 2e-3          0.955        -0.0017
    128-d + tuning, 30 epochs, lr 5e-3          0.955        -0.0017   <- the default (STATIC_DIM, TUNE_*)

(the experiment's fit texts: 3,000 item texts + 3,000 training queries, as :func:`fit_texts` picks them; 128 columns
keep the table at 3.9 MB, so the compact bundle without its catalog stays under 6 MB.)

Encoding (:class:`StaticTextEncoder` here, ``client.runtime_models.StaticTextModel`` on the device)::

    ids  = tokenizer(text).ids, truncated at max_length tokens ([CLS] and [SEP] included, as for MiniLM)
    keep = [t for t in ids if t not in skip_ids]             # [CLS], [SEP], [PAD]
    v    = mean(table[keep]) if keep else zeros(dim)          # [dim]
    e    = l2norm(v @ projection + bias)                      # [384]

The table ships as int8 with one float32 scale per row (``client.runtime_bundle.pack_rows``); see
``client/runtime_bundle.py`` for the file layout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.runtime_bundle import STATIC_ENCODER_ARRAYS, pack_rows, sha256_file
from export.errors import ExportError, ExportValidationError

log = logging.getLogger(__name__)

STATIC_DIM = 128  # table width: 30,522 x 128 int8 = 3.9 MB (see export_static for the measured choice)
SIF_COEFFICIENT = 1e-4  # model2vec's default
RIDGE = 1e-3  # ridge penalty, relative to the mean diagonal of X^T X
VOCAB_BATCH = 512
MAX_FIT_TEXTS = 3000  # per kind (item texts, queries): enough for a 129 x 384 least-squares fit
FIT_VOCAB_TOKENS = 3000  # single vocabulary tokens added to the fit (keeps the map sane for unseen words)
TUNE_EPOCHS = 30  # step 5 (see the table in the module doc)
TUNE_LR = 5e-3
TUNE_BATCH = 256


@dataclass
class StaticTables:
    """A distilled static encoder in float32: ``table [V, dim]``, ``projection [dim, D]``, ``bias [D]``, the token
    ids left out of the mean (``skip_ids``), and what the distillation measured (``info``)."""

    table: np.ndarray
    projection: np.ndarray
    bias: np.ndarray
    skip_ids: np.ndarray
    info: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    def encode_ids(self, ids: Sequence[int]) -> np.ndarray:
        """``[D]`` float32 embedding of one tokenised text (the float reference of the runtime's encoder)."""
        keep = [int(t) for t in ids if int(t) not in set(self.skip_ids.tolist())]
        v = self.table[keep].mean(0) if keep else np.zeros(self.dim, np.float32)
        e = v.astype(np.float64) @ self.projection + self.bias
        return (e / max(float(np.linalg.norm(e)), 1e-12)).astype(np.float32)

    def module(self) -> StaticTextEncoder:
        return StaticTextEncoder(self)

    def packed(self) -> dict[str, np.ndarray]:
        """The arrays of the bundle file (names: ``STATIC_ENCODER_ARRAYS``)."""
        q, scale = pack_rows(self.table)
        return {"table_q": q, "table_scale": scale, "projection": self.projection.astype(np.float32),
                "bias": self.bias.astype(np.float32), "skip_ids": self.skip_ids.astype(np.int64)}


class StaticTextEncoder(torch.nn.Module):
    """The static encoder in torch fp32, with ``TextEncoder``'s signature: ``(input_ids [B, T], attention_mask
    [B, T]) -> [B, D]`` L2-normalised (the export's reference for held-out slates and the parity gate)."""

    def __init__(self, tables: StaticTables) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.from_numpy(tables.table.astype(np.float32)), requires_grad=False)
        self.projection = torch.nn.Parameter(torch.from_numpy(tables.projection.astype(np.float32)),
                                             requires_grad=False)
        self.bias = torch.nn.Parameter(torch.from_numpy(tables.bias.astype(np.float32)), requires_grad=False)
        skip = torch.zeros(tables.table.shape[0], dtype=torch.bool)
        skip[torch.from_numpy(tables.skip_ids.astype(np.int64))] = True
        self.skip: torch.Tensor
        self.register_buffer("skip", skip)
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = (attention_mask > 0) & ~self.skip[input_ids]  # [B, T]: real, non-special tokens
        rows = self.table[input_ids] * m.unsqueeze(-1)  # [B, T, dim]
        v = rows.sum(1) / m.sum(1, keepdim=True).clamp(min=1)  # [B, dim] (zeros when nothing is left)
        return torch.nn.functional.normalize(v @ self.projection + self.bias, dim=-1, eps=1e-12)  # [B, D]


# ------------------------------------------------------------------------------------------- distillation


def special_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """``(skip_ids, unused_ids)``: [CLS]/[SEP]/[PAD] (left out of the mean) and [PAD]/[unusedN] (zero rows)."""
    vocab = tokenizer.get_vocab()
    skip = sorted(vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]") if t in vocab)
    unused = sorted(i for t, i in vocab.items() if t == "[PAD]" or (t.startswith("[unused") and t.endswith("]")))
    return skip, unused


def distill_static(text: torch.nn.Module, tokenizer: Any, fit_texts: Sequence[str], dim: int = STATIC_DIM,
                   max_length: int = 64, seed: int = 0) -> StaticTables:
    """Distil ``text`` (``(input_ids, attention_mask) -> [B, D]``) into a static table (module doc, steps 1-4).

    ``fit_texts``: in-domain texts for the alignment (item texts and queries); ``tokenizer``: the bundle's.
    """
    t0 = time.perf_counter()
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    skip, unused = special_ids(tokenizer)
    cls_sep = [vocab.get("[CLS]"), vocab.get("[SEP]")]
    if None in cls_sep:
        raise ExportError("static encoder: the tokenizer has no [CLS]/[SEP] token (a BERT WordPiece tokenizer is "
                          "expected)")
    if not 0 < dim <= 384:
        raise ExportError(f"static encoder: dim {dim} must be in 1..384")
    token_emb = _vocabulary_pass(text, size, int(cls_sep[0]), int(cls_sep[1]))  # [V, D]
    live = np.setdiff1d(np.arange(size), unused)
    comps, mean, explained = _pca(token_emb[live], dim)  # [D, dim], [D]
    table = np.zeros((size, dim), np.float32)
    table[live] = (token_emb[live] - mean) @ comps
    table *= _sif_weights(size)[:, None]
    t1 = time.perf_counter()

    # alignment: pooled static vectors of the fit texts (+ single tokens) -> the encoder's embeddings
    tokenizer.enable_truncation(max_length=max_length)
    texts = list(dict.fromkeys(t for t in fit_texts if t.strip()))
    target = encode_texts(text, tokenizer, texts)  # [N, D]
    skip_set = set(skip)
    pooled = np.stack([_pool(table, tokenizer.encode(t).ids, skip_set) for t in texts]) if texts else \
        np.zeros((0, dim), np.float32)
    rng = np.random.default_rng(seed)
    toks = rng.choice(live, size=min(FIT_VOCAB_TOKENS, len(live)), replace=False)
    x = np.concatenate([pooled, table[toks]]).astype(np.float64)  # [N + n_tok, dim]
    y = np.concatenate([target, token_emb[toks]]).astype(np.float64)  # [N + n_tok, D]
    projection, bias = _ridge(x, y)
    t2 = time.perf_counter()
    seqs = [[t for t in tokenizer.encode(s).ids if t not in skip_set] for s in texts] + [[int(t)] for t in toks]
    table, projection, bias, loss = _tune(table, projection.astype(np.float32), bias.astype(np.float32), seqs,
                                          np.concatenate([target, token_emb[toks]]), seed)
    tables = StaticTables(table, projection, bias, np.asarray(skip, np.int64), {})
    fit_cos = _cosines(np.stack([tables.encode_ids(tokenizer.encode(t).ids) for t in texts]), target) \
        if texts else np.ones(1)
    tables.info = {"vocabulary": size, "zero_rows": len(unused), "dim": dim, "sif_coefficient": SIF_COEFFICIENT,
                   "pca_explained_variance": explained,
                   "fit_texts": len(texts), "fit_vocabulary_tokens": len(toks), "ridge": RIDGE,
                   "tuning": {"epochs": TUNE_EPOCHS, "lr": TUNE_LR, "batch": TUNE_BATCH, "final_loss": loss},
                   "fit_cosine_mean": float(fit_cos.mean()), "fit_cosine_min": float(fit_cos.min()),
                   "seconds": {"vocabulary_pass_pca": round(t1 - t0, 1), "alignment": round(t2 - t1, 1),
                               "tuning": round(time.perf_counter() - t2, 1)}}
    log.info("static encoder distilled: %d x %d, fit cosine mean %.4f (%.1f s)", size, dim,
             tables.info["fit_cosine_mean"], time.perf_counter() - t0)
    return tables


@torch.inference_mode()
def _vocabulary_pass(text: torch.nn.Module, size: int, cls: int, sep: int) -> np.ndarray:
    """``[V, D]`` float32: the encoder's output for ``[CLS] t [SEP]``, every token id ``t``."""
    text.eval()
    chunks = []
    for lo in range(0, size, VOCAB_BATCH):
        t = torch.arange(lo, min(lo + VOCAB_BATCH, size), dtype=torch.long)
        ids = torch.stack([torch.full_like(t, cls), t, torch.full_like(t, sep)], dim=1)  # [b, 3]
        chunks.append(text(ids, torch.ones_like(ids)).float().numpy())
    return np.nan_to_num(np.concatenate(chunks).astype(np.float32))


@torch.inference_mode()
def encode_texts(text: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch: int = 64) -> np.ndarray:
    """``[N, D]`` float32 embeddings of ``texts`` by the encoder (batched by token length)."""
    encs = [tokenizer.encode(t).ids for t in texts]
    out = np.zeros((len(texts), 0), np.float32)
    order = np.argsort([len(e) for e in encs], kind="stable")
    for lo in range(0, len(order), batch):
        sel = order[lo : lo + batch]
        width = max(len(encs[i]) for i in sel)
        ids = torch.zeros((len(sel), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(sel):
            ids[r, : len(encs[i])] = torch.tensor(encs[i])
            mask[r, : len(encs[i])] = 1
        emb = text(ids, mask).float().numpy()  # [b, D]
        if out.shape[1] == 0:
            out = np.zeros((len(texts), emb.shape[1]), np.float32)
        out[sel] = emb
    return out


def fit_texts(prep: Any, catalog: Any, rng: np.random.Generator, per_kind: int = MAX_FIT_TEXTS) -> list[str]:
    """The alignment's in-domain texts: item texts of ``catalog`` and queries of the training sessions (never the
    held-out ones), ``per_kind`` of each at most (a seeded sample)."""
    items = list(dict.fromkeys(it.text() for it in (catalog if catalog is not None else [])))
    lg = getattr(prep, "log", None)
    train = getattr(prep, "train_idx", None)
    queries: list[str] = []
    if lg is not None and train is not None and len(getattr(lg, "queries", [])):
        queries = list(dict.fromkeys(str(lg.queries[int(lg.query[int(s)])]) for s in np.asarray(train)))

    def sample(xs: list[str]) -> list[str]:
        if len(xs) <= per_kind:
            return xs
        return [xs[i] for i in np.sort(rng.choice(len(xs), size=per_kind, replace=False))]

    return sample(items) + sample(queries)


def _pool(table: np.ndarray, ids: Sequence[int], skip: set[int]) -> np.ndarray:
    keep = [t for t in ids if t not in skip]
    return table[keep].mean(0) if keep else np.zeros(table.shape[1], np.float32)


def _pca(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``(components [D, dim], mean [D], explained variance ratio)`` of ``x [N, D]`` (model2vec's
    ``_pca_fit_transform``: centred covariance eigendecomposition; each component's sign makes its largest score
    positive)."""
    mean = x.mean(0, dtype=np.float64).astype(np.float32)
    xc = x - mean  # [N, D] float32
    cov = (xc.T @ xc).astype(np.float64) / max(len(x) - 1, 1)  # [D, D]
    vals, vecs = np.linalg.eigh(cov)
    comps = np.ascontiguousarray(vecs[:, ::-1][:, :dim], dtype=np.float32)  # [D, dim], by decreasing variance
    scores = xc @ comps  # [N, dim]
    signs = np.sign(scores[np.abs(scores).argmax(0), np.arange(comps.shape[1])])
    explained = float(np.clip(vals[::-1][:dim], 0, None).sum() / max(float(np.clip(vals, 0, None).sum()), 1e-30))
    return comps * np.where(signs == 0, 1.0, signs).astype(np.float32), mean, explained


def _sif_weights(n: int, coefficient: float = SIF_COEFFICIENT) -> np.ndarray:
    """model2vec's ``compute_weights``: Zipf probabilities over the ids' order, SIF weights ``a / (a + p)``."""
    inv_rank = 1.0 / np.arange(2, n + 2)
    proba = inv_rank / inv_rank.sum()
    return (coefficient / (coefficient + proba)).astype(np.float32)


def _ridge(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(W [dim, D], b [D])`` minimising ``|x W + b - y|^2 + lam |W|^2`` (``lam`` relative to ``x``'s scale)."""
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    gram = xc.T @ xc
    lam = RIDGE * float(np.trace(gram)) / max(gram.shape[0], 1)
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ yc)
    return w, ym - xm @ w


def _tune(table: np.ndarray, projection: np.ndarray, bias: np.ndarray, seqs: Sequence[Sequence[int]],
          target: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Step 5: Adam on ``1 - cos(l2norm(mean(table[seq]) @ projection + bias), target)`` over the fit pairs
    (``seqs``: token ids without the skipped ones; ``target [N, D]``). Returns the tuned arrays (float32) and the
    last epoch's mean loss."""
    if not seqs or TUNE_EPOCHS == 0:
        return table, projection, bias, float("nan")
    gen = torch.Generator().manual_seed(seed)
    width = max(max(len(x) for x in seqs), 1)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)  # [N, L]
    mask = torch.zeros((len(seqs), width))  # [N, L]
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1.0
    y = torch.nn.functional.normalize(torch.from_numpy(np.asarray(target, np.float32)), dim=-1)  # [N, D]
    t = torch.nn.Parameter(torch.from_numpy(table.copy()))
    w = torch.nn.Parameter(torch.from_numpy(projection.copy()))
    b = torch.nn.Parameter(torch.from_numpy(bias.copy()))
    opt = torch.optim.Adam([t, w, b], lr=TUNE_LR)
    loss_sum = 0.0
    with torch.enable_grad():
        for _ in range(TUNE_EPOCHS):
            loss_sum = 0.0
            for batch in torch.randperm(len(seqs), generator=gen).split(TUNE_BATCH):
                m = mask[batch]  # [b, L]
                v = (t[ids[batch]] * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)  # [b, dim]
                e = torch.nn.functional.normalize(v @ w + b, dim=-1)  # [b, D]
                loss = (1.0 - (e * y[batch]).sum(-1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(batch)
    out = t.detach().numpy().astype(np.float32)
    return out, w.detach().numpy().astype(np.float32), b.detach().numpy().astype(np.float32), loss_sum / len(seqs)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1) + 1e-12)


# ------------------------------------------------------------------------------------------- bundle file


def write_static(tables: StaticTables, path: Path) -> None:
    arrays = tables.packed()
    assert tuple(arrays) == STATIC_ENCODER_ARRAYS
    with open(path, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]


def validate_static(path: Path, tables: StaticTables, tokenizer: Any, probe_texts: Sequence[str],
                    max_length: int, bar: float) -> dict[str, Any]:
    """The parity gate: the file as the runtime reads it (``client.runtime_models.StaticTextModel``) against the
    float reference (:class:`StaticTextEncoder`) on ``probe_texts``: min cosine must reach ``bar``."""
    from client.runtime_bundle import BundleError
    from client.runtime_models import StaticTextModel, encode_tokens

    try:
        model = StaticTextModel.from_bytes(path.read_bytes(), path.name)
    except BundleError as e:
        raise ExportValidationError(path.name, "loads in the runtime", str(e), "loads") from e
    if model.dim != tables.projection.shape[1]:
        raise ExportValidationError(path.name, "output dim", model.dim, tables.projection.shape[1])
    tokenizer.enable_truncation(max_length=max_length)
    ids = [tokenizer.encode(t).ids for t in probe_texts]
    module = tables.module()
    with torch.inference_mode():
        ref = np.stack([module(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))[0].numpy()
                        for x in ids])
    got = np.stack([encode_tokens(model, x) for x in ids])
    numpy_ref = np.stack([tables.encode_ids(x) for x in ids])
    cos = _cosines(got, ref)
    stats = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
             "max_abs_diff": float(np.abs(got - ref).max()),
             "torch_vs_numpy_max_abs_diff": float(np.abs(ref - numpy_ref).max()), "probe_texts": len(ids)}
    if not stats["cosine_min"] >= bar:
        raise ExportValidationError(path.name, "cosine_min", stats["cosine_min"], bar)
    if not stats["torch_vs_numpy_max_abs_diff"] <= 1e-4:  # the two float references must agree
        raise ExportValidationError(path.name, "torch vs numpy reference max_abs_diff",
                                    stats["torch_vs_numpy_max_abs_diff"], 1e-4)
    return stats


def export_static(tables: StaticTables, staging: Path, tokenizer: Any, probe_texts: Sequence[str],
                  max_length: int, bar: float, reference: np.ndarray | None = None) -> tuple[str, dict[str, Any]]:
    """Write and validate the file in ``staging``; returns ``(name, files entry)``. ``reference``: the full text
    encoder's embeddings of ``probe_texts`` (recorded as the static encoder's distance from it)."""
    from client.runtime_bundle import STATIC_ENCODER_FILE

    path = staging / STATIC_ENCODER_FILE
    write_static(tables, path)
    fidelity = validate_static(path, tables, tokenizer, probe_texts, max_length, bar)
    rec: dict[str, Any] = {
        "component": "text_encoder", "kind": "static", "backend": "any (numpy)", "precision": "int8",
        "quantization": "table int8 per row (symmetric, one float32 scale per row); projection and bias float32",
        "bytes": path.stat().st_size, "sha256": sha256_file(path),
        "arrays": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in tables.packed().items()},
        "fidelity": {**fidelity, "metric": "cosine", "bar": bar, "reference": "static encoder fp32 (torch)"},
    }
    if reference is not None:
        tokenizer.enable_truncation(max_length=max_length)
        mine = np.stack([tables.encode_ids(tokenizer.encode(t).ids) for t in probe_texts])
        cos = _cosines(mine, reference)
        rec["distance_from_text_encoder"] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                                             "texts": len(probe_texts), "note": "informative, not a gate"}
    return STATIC_ENCODER_FILE, rec

"""The inputs export validates on: probe texts, images and head slates (each with torch fp32's output), and the
held-out slates whose whole-pipeline ranking the runtime must reproduce (``export/validate.py`` measures both).

Head probes and held-out slates are real sessions through the torch pipeline (:func:`shared_model.data.head_inputs`),
so a bundle is checked on the features it will be served with.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.errors import ExportError
from export.spec import ExportSpec, random_head_inputs, random_images
from export.validate import PROBE_TEXTS, HeldOut, Probe

# ------------------------------------------------------------------------------------------------ probes


def load_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    return tok


def probe_texts(prep: Any, store: Any, rng: np.random.Generator, n: int = 40) -> list[str]:
    texts = list(PROBE_TEXTS)
    queries = list(getattr(prep.log, "queries", []))
    if queries:
        texts += [queries[i] for i in rng.choice(len(queries), size=min(n // 2, len(queries)), replace=False)]
    items = [it.text() for it in getattr(prep, "catalog", [])]
    if items:
        texts += [items[i] for i in rng.choice(len(items), size=min(n // 2, len(items)), replace=False)]
    return texts


def text_feeds(tokenizer: Any, texts: list[str], seed: int, sizes: dict[str, int] | None = None
                ) -> dict[str, np.ndarray]:
    """``batch`` texts (rotating through ``texts`` from ``seed``), truncated and padded to exactly ``tokens``."""
    b, t = (sizes or {"batch": 2, "tokens": 16})["batch"], (sizes or {"batch": 2, "tokens": 16})["tokens"]
    tokenizer.enable_truncation(max_length=t)
    ids = np.zeros((b, t), np.int64)
    mask = np.zeros((b, t), np.int64)
    for r in range(b):
        x = tokenizer.encode(texts[(seed * 7 + r) % len(texts)]).ids
        ids[r, : len(x)] = x
        mask[r, : len(x)] = 1
    if b > 1 and mask[1].sum() == t:  # trace with some padding: keeps the padded-mask path in the graph
        mask[1, t // 2 :] = 0
        ids[1, t // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def text_probes(spec: ExportSpec, tokenizer: Any, texts: list[str], ref: Callable[[dict[str, np.ndarray]], np.ndarray]
                 ) -> list[Probe]:
    sizes = [*spec.checks, *[s for s in spec.signatures for _ in range(4)]]
    out = []
    for i, s in enumerate(sizes):
        feeds = text_feeds(tokenizer, texts, i + 1, dict(s))
        out.append(Probe(dict(s), feeds, ref(feeds)))
    return out


def probe_images(prep: Any, store: Any, n_probe: int = 12, n_calib: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Probe and calibration pixels: the catalog's own photos when it has enough, else synthetic images."""
    from shared_model.encoders import ImageEncoder, load_image

    paths = [it.image_path for it in getattr(prep, "catalog", []) if it.image_path]
    imgs = []
    for p in paths[: 4 * (n_probe + n_calib)]:
        img = load_image(p)
        if img is not None:
            imgs.append(img)
        if len(imgs) >= n_probe + n_calib:
            break
    if len(imgs) >= n_probe + n_calib:
        pix = ImageEncoder.preprocess(imgs).numpy()
        return pix[:n_probe], pix[n_probe:]
    return random_images(n_probe, seed=1), random_images(n_calib, seed=2)


def head_probe_feeds(prep: Any, spec: ExportSpec) -> Callable[[dict[str, int], int], dict[str, np.ndarray]]:
    """Head inputs of real slates (``shared_model.data.head_inputs``), cut or zero-padded to the probe sizes."""
    from shared_model.data import head_inputs

    slates = prep.slates("test")
    if len(slates) == 0:
        slates = prep.slates("train")
    table = prep.table()

    def feeds(sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        b, s = sizes["batch"], sizes["slate"]
        idx = np.random.default_rng(seed).choice(len(slates), size=b, replace=len(slates) < b)
        with torch.inference_mode():
            x = {k: v.numpy() for k, v in head_inputs(slates.select(idx), table).items()}
        out = {}
        for t in spec.inputs:
            v = x[t.name]
            if v.ndim == 3:
                pad = np.zeros((b, s, v.shape[2]), np.float32)
                pad[:, : min(s, v.shape[1])] = v[:, :s]
                v = pad
            out[t.name] = np.ascontiguousarray(v, dtype=np.float32)
        return out

    return feeds


def sample_at(spec: ExportSpec, trace: dict[str, np.ndarray], probes: list[Probe], sizes: dict[str, int]
               ) -> dict[str, np.ndarray]:
    for p in probes:
        if p.sizes == sizes:
            return p.feeds
    if spec.component == "head":
        return random_head_inputs(spec, sizes)
    raise ExportError(f"{spec.component}: no sample input at {sizes}")


# ------------------------------------------------------------------------------------------- held-out slates


def held_out(prep: Any, store: Any, text: torch.nn.Module, head: torch.nn.Module, tokenizer: Any,
             max_slates: int, max_length: int, seed: int) -> HeldOut:
    """Held-out slates for the pipeline check, and torch fp32's scores (torch text encoder + head)."""
    from shared_model.data import head_inputs

    slates = prep.slates("test")
    ids = list(prep.store.item_ids)
    known = set(store.item_ids)
    keep = [i for i in range(len(slates))
            if all(ids[r] in known for r in slates.items[i][slates.valid[i]].tolist())]
    if not keep:
        raise ExportError("no held-out slate whose items are all in the exported catalog: cannot measure the "
                          "pipeline's ranking fidelity (pass the data folder the head was trained on)")
    rng = np.random.default_rng(seed)
    sel = np.sort(rng.choice(keep, size=min(max_slates, len(keep)), replace=False))
    sl = slates.select(sel)
    lg = prep.log
    queries = [str(lg.queries[int(lg.query[sid])]) for sid in sl.session_ids]
    tokenizer.enable_truncation(max_length=max_length)
    qemb = {}
    with torch.inference_mode():
        for q in dict.fromkeys(queries):
            x = torch.tensor([tokenizer.encode(q).ids], dtype=torch.long)
            qemb[q] = text(x, torch.ones_like(x))[0].float()
        inputs = head_inputs(sl, prep.table())
        inputs["query"] = torch.stack([qemb[q] for q in queries])
        ref = head(**inputs).float().numpy()
    valid = sl.valid.numpy()
    held = HeldOut([], [], [], [], [], sl.grades.numpy(), valid, np.where(valid, ref, 0.0).astype(np.float32))
    for i, sid in enumerate(sl.session_ids):
        k = int(valid[i].sum())
        seg = lg.slate(int(sid))
        held.queries.append(queries[i])
        held.candidates.append([ids[r] for r in sl.items[i, :k].tolist()])
        held.recent.append([ids[r] for r in sl.user_items[i][sl.user_valid[i]].tolist()])
        held.retrieval.append(np.asarray(lg.retrieval_score[seg][:k], np.float32))
        held.ranks.append(np.asarray(lg.prod_rank[seg][:k], np.float32))
    return held

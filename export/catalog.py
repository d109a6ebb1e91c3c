"""The bundle's catalog: the feature store packed as int8 rows with per-row scales (``catalog.npz``, read by
``client.runtime_bundle.PackedCatalog``), with the raw prices the slate features need and its measured fidelity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from client.runtime_bundle import PackedCatalog, sha256_file
from shared_model.head_features import MODALITIES


def packed_catalog(store: Any, catalog: Any) -> PackedCatalog:
    """``store`` (a FeatureStore; prices from ``catalog``) as the bundle's int8 catalog, in memory: also the rows a
    search API sends a device in a candidates request (``client.runtime_bundle.candidates_request``)."""
    return PackedCatalog.from_float(store.item_ids, store.text, store.image, store.video, store.mask, store.dense,
                                    _prices(catalog, store))


def pack_catalog(store: Any, catalog: Any, path: Path) -> dict[str, Any]:
    """Write ``store`` (a FeatureStore; prices from ``catalog``) to ``path``; returns its manifest ``files`` entry."""
    packed = packed_catalog(store, catalog)
    packed.save(path)
    return {"component": "catalog", "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "quantization": "int8 per row (symmetric, one float32 scale per row) for text/image/video",
            "fidelity": _catalog_fidelity(store, packed)}


def _prices(catalog: Any, store: Any) -> np.ndarray:
    price = {it.item_id: it.price for it in catalog}
    return np.array([float(price.get(i, float("nan"))) for i in store.item_ids], dtype=np.float64)


def _catalog_fidelity(store: Any, packed: PackedCatalog) -> dict[str, float]:
    out = {}
    rows = np.arange(len(store.item_ids))
    for name in MODALITIES:
        ref = store.modality(name)
        got = packed.modality(name, rows)
        present = np.abs(ref).sum(1) > 0
        if present.any():
            a, b = ref[present].astype(np.float64), got[present].astype(np.float64)
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            out[f"{name}_cosine_min"] = float(cos.min())
    return out

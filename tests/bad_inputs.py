"""Writers of the bad inputs that ``test_bad_input.py`` feeds to fedrank: catalogs, session logs, data folders,
scenarios, judgments and damaged copies of an exported bundle."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from client.runtime import Reranker
from client.runtime_bundle import read_manifest
from export.cli import read_id_file
from shared_model.catalog_io import save_catalog_jsonl
from shared_model.config import parse_run_config
from shared_model.schema import Catalog, CatalogItem, SessionLog
from simulations.evaluate import evaluate_judgments

ROOT = Path(__file__).resolve().parent.parent
HEADER = "item_id,title,description,category,brand,color,price,rating,image_path,video_frames"
ROWS = ["a1,red cotton t-shirt,,tshirt,acme,red,10,4.0,,", "a2,blue cotton t-shirt,,tshirt,acme,blue,12,4.5,,",
        "a3,ceramic coffee mug,,mug,acme,white,8,,,"]
JUDGMENTS = ["query,item_id,grade", "red t-shirt,a1,3", "red t-shirt,a2,1", "coffee mug,a3,3"]


# ------------------------------------------------------------------------------------------ writers


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _csv(tmp: Path, rows: list[str], header: str = HEADER, name: str = "catalog.csv") -> Path:
    return _write(tmp / name, "\n".join([header, *rows]) + "\n")


def _replace(rows: list[str], i: int, row: str) -> list[str]:
    return [row if k == i else r for k, r in enumerate(rows)]


def _jsonl(tmp: Path, lines: list[str], name: str = "catalog.jsonl") -> Path:
    return _write(tmp / name, "\n".join(lines) + "\n")


GOOD_JSONL = [json.dumps({"item_id": "a1", "title": "red cotton t-shirt", "price": 10}),
              json.dumps({"item_id": "a2", "title": "ceramic coffee mug", "video_frames": ["f0.jpg", "f1.jpg"]})]


def _session_log() -> SessionLog:
    """3 sessions of 3 impressions over a 3-item catalog."""
    n, s = 3, 3
    return SessionLog(
        user=np.array([0, 0, 1], np.int32), query=np.array([0, 1, 0], np.int32), randomized=np.zeros(n, bool),
        timestamp=np.arange(n, dtype=np.int64), offsets=np.arange(0, n * s + 1, s, dtype=np.int64),
        items=np.tile(np.arange(s, dtype=np.int32), n), clicks=np.eye(n, s, dtype=np.uint8).ravel(),
        purchases=np.zeros(n * s, np.uint8), prod_rank=np.tile(np.arange(s, dtype=np.int16), n),
        retrieval_score=np.zeros(n * s, np.float32), grades=np.ones(n * s, np.uint8),
        utility=np.zeros(n * s, np.float32), queries=["red t-shirt", "coffee mug"],
    )


def _log_file(tmp: Path, **changes: Any) -> Path:
    """A saved session log with arrays replaced (``None`` deletes one)."""
    path = tmp / "sessions.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    _session_log().save(path)
    if changes:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        for k, v in changes.items():
            if v is None:
                del arrays[k]
            else:
                arrays[k] = v
        np.savez(path, **arrays)
    return path


def _data_dir(tmp: Path, **log_changes: Any) -> Path:
    """A data folder (catalog.jsonl + sessions.npz) as ``fedrank generate`` writes it, minus images."""
    d = tmp / "data"
    items = [CatalogItem(item_id=f"a{k}", title=t, price=10.0 + k)
             for k, t in enumerate(["red cotton t-shirt", "blue cotton t-shirt", "ceramic coffee mug"])]
    save_catalog_jsonl(Catalog(items), _write(d / "catalog.jsonl", ""))
    _log_file(d, **log_changes)
    return d


def _scenario(tmp: Path, text: str) -> Path:
    return _write(tmp / "bad.toml", text)


def _scenario_config(path: Path) -> Callable[[], object]:
    from simulations.runner import scenario_config

    return lambda: parse_run_config(scenario_config(str(path)))


def _evaluate(tmp: Path, judgments: list[str]) -> Callable[[], object]:
    cat = _csv(tmp, ROWS)
    judg = _write(tmp / "judgments.csv", "\n".join(judgments) + "\n")
    return lambda: evaluate_judgments(cat, judg, {}, tmp / "eval", progress=False)


# ------------------------------------------------------------------------------------------ bundles


def _bundle_copy(tmp: Path) -> Path:
    from test_export import tiny_setup  # the module pytest collected: its bundle is built once per session

    dst = tmp / "bundle"
    shutil.copytree(tiny_setup()[2] / "b", dst)
    return dst


def _manifest(b: Path) -> dict[str, Any]:
    return json.loads((b / "manifest.json").read_text())


def _head_file(b: Path) -> str:
    return str(_manifest(b)["components"]["head"]["files"]["onnx"])


def _reseal(b: Path, man: dict[str, Any]) -> None:
    """Write ``man`` as the bundle's manifest with a matching ``manifest.sha256`` (``sha256sum`` format): what an
    exporter that wrote this manifest would leave behind."""
    data = json.dumps(man, indent=1).encode("utf-8")
    (b / "manifest.json").write_bytes(data)
    (b / "manifest.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  manifest.json\n", encoding="utf-8")


def _edit_manifest(tmp: Path, edit: Callable[[dict[str, Any]], None], reseal: bool = True) -> Callable[[], object]:
    """A bundle whose manifest was edited: re-sealed (a badly written manifest) unless ``reseal=False`` (tampered)."""
    b = _bundle_copy(tmp)
    man = _manifest(b)
    edit(man)
    if reseal:
        _reseal(b, man)
    else:
        (b / "manifest.json").write_text(json.dumps(man, indent=1))
    return lambda: Reranker.load(b, backend="onnx")


def _swap_item_ids(man: dict[str, Any]) -> None:
    ids = man["catalog"]["item_ids"]
    ids[0], ids[1] = ids[1], ids[0]


def _duplicate_item_id(man: dict[str, Any]) -> None:
    ids = man["catalog"]["item_ids"]
    ids[1] = ids[0]


def _manifest_digest(tmp: Path, text: str | None, version: int | None = None) -> Callable[[], object]:
    """A bundle whose ``manifest.sha256`` holds ``text`` (``{sha}`` is the manifest's digest), or none at all
    (``None``); ``version`` rewrites ``format_version`` first (an older bundle)."""
    b = _bundle_copy(tmp)
    if version is not None:
        man = _manifest(b)
        man["format_version"] = version
        (b / "manifest.json").write_text(json.dumps(man, indent=1))
    digest = b / "manifest.sha256"
    digest.unlink(missing_ok=True)
    if text is not None:
        digest.write_text(text.format(sha=hashlib.sha256((b / "manifest.json").read_bytes()).hexdigest()))
    return lambda: Reranker.load(b, backend="onnx")


def _bundle_with_ids(tmp: Path, renames: dict[str, str]) -> Path:
    """A sealed bundle copy whose catalog items are renamed (``old id -> new id``), e.g. to ids that hold spaces."""
    b = _bundle_copy(tmp)
    man = _manifest(b)
    man["catalog"]["item_ids"] = [renames.get(i, i) for i in man["catalog"]["item_ids"]]
    _reseal(b, man)
    return b


def _id_file(tmp: Path, content: str | bytes, flag: str = "--candidates", scores: bool = True,
             name: str = "c.txt") -> Callable[[], object]:
    path = _write(tmp / name, content)
    return lambda: read_id_file(path, flag, scores=scores)


def _bundle_missing_file(tmp: Path) -> Callable[[], object]:
    b = _bundle_copy(tmp)
    (b / _head_file(b)).unlink()
    return lambda: Reranker.load(b, backend="onnx")


def _bundle_corrupt_file(tmp: Path) -> Callable[[], object]:
    b = _bundle_copy(tmp)
    data = bytearray((b / _head_file(b)).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / _head_file(b)).write_bytes(bytes(data))
    return lambda: Reranker.load(b, backend="onnx")


def _bundle_garbage_catalog(tmp: Path) -> Callable[[], object]:
    b = _bundle_copy(tmp)
    (b / "catalog.npz").write_bytes(b"\x00garbage" * 10)
    return lambda: Reranker.load(b, backend="onnx", verify=False)


def _manifest_text(tmp: Path, text: str) -> Callable[[], object]:
    b = _bundle_copy(tmp)
    (b / "manifest.json").write_text(text)
    return lambda: read_manifest(b)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(man: dict[str, Any]) -> None:
        if value is _DELETE:
            del man[key]
        else:
            man[key] = value
    return edit


_DELETE = object()

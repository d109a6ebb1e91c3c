"""A bundle is verified as a whole: ``manifest.sha256`` covers the manifest (which lists every file's sha256), and
the runtime reads each file once, checks its sha256 on those bytes and builds the models from the same bytes.

So swapping two ``item_ids`` in the manifest is refused, and a bundle file that changes on disk while or after the
runtime loads it changes no score and crashes nothing (LiteRT used to map the file and die with SIGBUS).
Uses the stand-in-encoder bundle built once per session by ``tests/test_export.py`` (``tiny_setup``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_export import tiny_setup  # the module pytest collected: its cached bundle is shared

from client.runtime import Reranker
from client.runtime_bundle import BundleError

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("onnx", "tflite")
PHOTO = np.full((224, 224, 3), 128, np.uint8)


@pytest.fixture(scope="module")
def bundle() -> Path:
    return tiny_setup()[2] / "b"


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def _manifest(b: Path) -> dict[str, Any]:
    return json.loads((b / "manifest.json").read_text())


def _model_files(b: Path, backend: str) -> list[str]:
    comps = _manifest(b)["components"]
    return [comps[c]["files"][backend] for c in ("text_encoder", "image_encoder", "head")]


def _results(rr: Reranker) -> list[list[tuple[str, float]]]:
    """A text query with a user history, and a photo query (the image encoder is created on first use)."""
    ids = rr.catalog.item_ids[:30]
    return [rr.rerank("red canvas sneakers", ids, recent_item_ids=ids[:3]),
            rr.rerank(query_image=PHOTO, candidate_ids=ids)]


def _load_error(b: Path) -> BundleError:
    with pytest.raises(BundleError) as e:
        Reranker.load(b, backend="onnx")
    return e.value


# ------------------------------------------------------------------------------------------------ the manifest


def test_export_writes_a_sha256sum_digest_of_the_manifest(bundle: Path) -> None:
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert (bundle / "manifest.sha256").read_text(encoding="utf-8") == f"{digest}  manifest.json\n"


def test_swapped_item_ids_are_refused(bundle: Path, tmp_path: Path) -> None:
    # Prepare: two products trade places in the manifest, so each would get the other's embeddings and score
    b = _copy(bundle, tmp_path)
    man = _manifest(b)
    ids = man["catalog"]["item_ids"]
    ids[0], ids[1] = ids[1], ids[0]
    (b / "manifest.json").write_text(json.dumps(man, indent=1))
    # Execute
    err = _load_error(b)
    # Assert
    assert err.file == "manifest.json" and "sha256 mismatch" in err.problem and "manifest.sha256" in err.problem


def test_any_byte_of_the_manifest_is_covered(bundle: Path, tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    (b / "manifest.json").write_bytes((b / "manifest.json").read_bytes() + b"\n")  # whitespace only
    assert _load_error(b).file == "manifest.json"


@pytest.mark.parametrize("text", ["{sha:.32}  manifest.json\n", "{sha:.63}\n", "{sha}x  manifest.json\n", "",
                                  "{sha}  catalog.npz\n", "not a digest\n"])
def test_malformed_manifest_digest_is_refused(bundle: Path, tmp_path: Path, text: str) -> None:
    b = _copy(bundle, tmp_path)
    sha = hashlib.sha256((b / "manifest.json").read_bytes()).hexdigest()
    (b / "manifest.sha256").write_text(text.format(sha=sha))
    err = _load_error(b)
    assert err.file == "manifest.sha256", err


def test_manifest_digest_in_sha256sum_binary_mode_and_upper_case_is_accepted(bundle: Path, tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    sha = hashlib.sha256((b / "manifest.json").read_bytes()).hexdigest()
    (b / "manifest.sha256").write_text(f"{sha.upper()} *manifest.json\r\n")
    assert Reranker.load(b, backend="onnx").catalog.item_ids == _manifest(b)["catalog"]["item_ids"]


def test_missing_manifest_digest_is_refused(bundle: Path, tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    (b / "manifest.sha256").unlink()
    err = _load_error(b)
    assert err.file == "manifest.sha256" and "missing" in err.problem and "re-export" in err.problem


def test_bundle_of_the_previous_format_asks_for_a_re_export(bundle: Path, tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    (b / "manifest.sha256").unlink()
    (b / "manifest.json").write_text(json.dumps({**_manifest(b), "format_version": 1}, indent=1))
    err = _load_error(b)
    assert err.file == "manifest.json" and "version 1" in err.problem and "re-export" in err.problem


# ------------------------------------------------------------------------------------------------ the files


def _patch_model_constructor(monkeypatch: pytest.MonkeyPatch, backend: str, before: Callable[[], None]) -> None:
    """Run ``before`` each time the backend creates a model (ONNX Runtime session, LiteRT interpreter)."""
    if backend == "onnx":
        import onnxruntime as module
        attr = "InferenceSession"
    else:
        import ai_edge_litert.interpreter as module
        attr = "Interpreter"
    real = getattr(module, attr)

    def create(*args: Any, **kwargs: Any) -> Any:
        before()
        return real(*args, **kwargs)
    monkeypatch.setattr(module, attr, create)


@pytest.mark.parametrize("backend", BACKENDS)
def test_files_changed_while_loading_change_nothing(bundle: Path, tmp_path: Path, backend: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the reference results, then a copy whose model files turn to garbage the moment a model is created,
    # i.e. after their sha256 was checked
    want = _results(Reranker.load(bundle, backend=backend))
    b = _copy(bundle, tmp_path)

    def overwrite() -> None:
        for name in _model_files(b, backend):
            (b / name).write_bytes(b"\x00garbage" * 8)
    _patch_model_constructor(monkeypatch, backend, overwrite)
    # Execute
    got = _results(Reranker.load(b, backend=backend))
    # Assert: the models were built from the verified bytes, not from the files
    assert got == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_files_overwritten_after_load_change_nothing_and_do_not_crash(bundle: Path, tmp_path: Path,
                                                                      backend: str) -> None:
    """In its own process: LiteRT used to map the file, so a shorter file under it meant SIGBUS (exit 135)."""
    # Prepare
    b = _copy(bundle, tmp_path)
    code = textwrap.dedent(f"""
        import json
        import numpy as np
        from client.runtime import Reranker

        def results(rr):
            ids = rr.catalog.item_ids[:30]
            photo = np.full((224, 224, 3), 128, np.uint8)
            return [rr.rerank("red canvas sneakers", ids, recent_item_ids=ids[:3]),
                    rr.rerank(query_image=photo, candidate_ids=ids)]

        want = results(Reranker.load({str(bundle)!r}, backend={backend!r}))
        rr = Reranker.load({str(b)!r}, backend={backend!r})
        for name in {sorted(p.name for p in b.iterdir())!r}:
            with open({str(b)!r} + "/" + name, "r+b") as f:  # in place: same inode, now 16 bytes long
                f.truncate(0)
                f.write(b"\\x00garbage" * 2)
        got = results(rr)
        print(json.dumps({{"same": got == want, "n": len(got[0])}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Execute
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    # Assert
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"same": True, "n": 30}

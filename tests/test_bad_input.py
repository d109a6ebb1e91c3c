"""The bad-input matrix: every malformed input gives a typed error naming the file, line or field.

One row per case, grouped by input: catalogs, session logs (``sessions.npz``), relevance judgments, run configs
and scenario files, checkpoints, exported bundles (Flower messages: ``test_bad_messages.py``). Each row asserts the exception type and what the message names. The CLI
rows run ``fedrank`` itself: exit code 2, one error line on stderr, no traceback, and output files absent (or
untouched when they existed before the failing command); interruptions and concurrent writers:
``test_interrupts.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from client.runtime import Reranker, RerankInputError
from client.runtime_bundle import BundleError, read_manifest
from export.errors import ExportError
from fedrank.cli import main
from shared_model.catalog_io import CatalogError, load_catalog, load_judgments, parse_label_map
from shared_model.checkpoint import CheckpointError, load_checkpoint
from shared_model.config import ConfigError, load_defaults, merge_overrides, parse_run_config
from shared_model.schema import SessionLog, SessionLogError
from simulations.evaluate import JudgmentsError
from tests.bad_inputs import (
    _DELETE,
    GOOD_JSONL,
    HEADER,
    JUDGMENTS,
    ROOT,
    ROWS,
    _bundle_copy,
    _bundle_corrupt_file,
    _bundle_garbage_catalog,
    _bundle_missing_file,
    _bundle_with_ids,
    _csv,
    _data_dir,
    _duplicate_item_id,
    _edit_manifest,
    _evaluate,
    _head_file,
    _id_file,
    _jsonl,
    _log_file,
    _manifest_digest,
    _manifest_text,
    _replace,
    _scenario,
    _scenario_config,
    _set,
    _swap_item_ids,
    _write,
)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # Messages built outside a run


@dataclass(frozen=True)
class Case:
    """``make(tmp)`` writes the bad input under ``tmp`` and returns the call that must fail with ``exc`` whose
    message contains every string of ``names`` (the file[:line], the field, the reason)."""

    id: str
    make: Callable[[Path], Callable[[], object]]
    exc: type[BaseException]
    names: tuple[str, ...]


# ------------------------------------------------------------------------------------------ the matrix


CASES = [
    # catalogs ------------------------------------------------------------------------------------------------
    Case("catalog-missing-title-column", lambda t: lambda: load_catalog(_csv(t, ["a1,x"], header="item_id,name")),
         CatalogError, ("catalog.csv:1", "field 'title'", "required column missing")),
    Case("catalog-price-not-a-number", lambda t: lambda: load_catalog(
        _csv(t, _replace(ROWS, 1, "a2,blue cotton t-shirt,,tshirt,acme,blue,twelve,4.5,,"))),
         CatalogError, ("catalog.csv:3", "field 'price'", "not a number: 'twelve'")),
    Case("catalog-negative-price", lambda t: lambda: load_catalog(
        _csv(t, _replace(ROWS, 2, "a3,ceramic coffee mug,,mug,acme,white,-8,,,"))),
         CatalogError, ("catalog.csv:4", "field 'price'", "must be >= 0")),
    Case("catalog-duplicate-item-id", lambda t: lambda: load_catalog(_csv(t, [*ROWS, ROWS[0]])),
         CatalogError, ("catalog.csv:5", "field 'item_id'", "duplicate item_id 'a1'", "line 2")),
    Case("catalog-empty-title", lambda t: lambda: load_catalog(
        _csv(t, _replace(ROWS, 0, "a1,,,tshirt,acme,red,10,4,,"))),
         CatalogError, ("catalog.csv:2", "field 'title'", "empty")),
    Case("catalog-wrong-column-count", lambda t: lambda: load_catalog(_csv(t, _replace(ROWS, 1, "a2,blue,x"))),
         CatalogError, ("catalog.csv:3", "wrong column count")),
    Case("catalog-jsonl-invalid-json", lambda t: lambda: load_catalog(_jsonl(t, [GOOD_JSONL[0], '{"item_id": "a2",'])),
         CatalogError, ("catalog.jsonl:2", "field '(json)'", "invalid JSON")),
    Case("catalog-jsonl-not-an-object", lambda t: lambda: load_catalog(_jsonl(t, [GOOD_JSONL[0], '["a2", "mug"]'])),
         CatalogError, ("catalog.jsonl:2", "expected a JSON object")),
    Case("catalog-jsonl-frames-not-a-list", lambda t: lambda: load_catalog(
        _jsonl(t, [GOOD_JSONL[0], json.dumps({"item_id": "a2", "title": "mug", "video_frames": 3})])),
         CatalogError, ("catalog.jsonl:2", "field 'video_frames'")),
    Case("catalog-not-utf8", lambda t: lambda: load_catalog(
        _write(t / "catalog.csv", (HEADER + "\na1,caf\xe9\n").encode("latin-1"))),
         CatalogError, ("catalog.csv:2", "(encoding)", "not valid UTF-8")),
    Case("catalog-unknown-extension", lambda t: lambda: load_catalog(_write(t / "catalog.xlsx", "x")),
         CatalogError, ("catalog.xlsx", "unknown extension")),
    Case("catalog-missing-file", lambda t: lambda: load_catalog(t / "nowhere.csv"),
         CatalogError, ("nowhere.csv", "file not found")),
    Case("catalog-header-only", lambda t: lambda: load_catalog(_csv(t, [])),
         CatalogError, ("catalog.csv", "no valid product rows")),
    # session logs --------------------------------------------------------------------------------------------
    Case("log-not-an-npz", lambda t: lambda: SessionLog.load(_write(t / "sessions.npz", b"clicks,items\n1,2\n")),
         SessionLogError, ("sessions.npz", "not an .npz file")),
    Case("log-truncated", lambda t: lambda: SessionLog.load(
        _write(t / "s" / "sessions.npz", _log_file(t).read_bytes()[:300])),
         SessionLogError, ("sessions.npz", "not a readable .npz")),
    Case("log-missing-array", lambda t: lambda: SessionLog.load(_log_file(t, clicks=None)),
         SessionLogError, ("sessions.npz", "missing arrays ['clicks']")),
    Case("log-offsets-length", lambda t: lambda: SessionLog.load(_log_file(t, offsets=np.array([0, 3, 6], np.int64))),
         SessionLogError, ("sessions.npz", "field 'offsets'", "expected sessions + 1 = 4")),
    Case("log-offsets-decrease", lambda t: lambda: SessionLog.load(
        _log_file(t, offsets=np.array([0, 6, 3, 9], np.int64))),
         SessionLogError, ("sessions.npz", "field 'offsets'", "never decrease")),
    Case("log-impressions-length", lambda t: lambda: SessionLog.load(_log_file(t, clicks=np.zeros(8, np.uint8))),
         SessionLogError, ("sessions.npz", "field 'clicks'", "8 entries", "9 impressions")),
    Case("log-query-index-out-of-range", lambda t: lambda: SessionLog.load(
        _log_file(t, query=np.array([0, 1, 5], np.int32))),
         SessionLogError, ("sessions.npz", "field 'query'", "[0, 2)")),
    Case("log-float-items", lambda t: lambda: SessionLog.load(_log_file(t, items=np.zeros(9, np.float32))),
         SessionLogError, ("sessions.npz", "field 'items'", "expected integers")),
    Case("log-queries-not-json", lambda t: lambda: SessionLog.load(_log_file(t, queries_json=np.array("[red"))),
         SessionLogError, ("sessions.npz", "field 'queries_json'", "not valid JSON")),
    Case("log-items-outside-the-catalog", lambda t: _prepare(_data_dir(t, items=np.full(9, 7, np.int32))),
         SessionLogError, ("sessions.npz", "field 'items'", "catalog row 7 out of range", "3 items")),
    Case("log-missing", lambda t: lambda: SessionLog.load(t / "sessions.npz"),
         FileNotFoundError, ("sessions.npz", "not found")),
    # judgments -----------------------------------------------------------------------------------------------
    Case("judgments-missing-grade-column", lambda t: lambda: load_judgments(
        _write(t / "j.csv", "query,item_id\nq,a1\n")),
         CatalogError, ("j.csv:1", "field 'grade'", "required column missing")),
    Case("judgments-grade-not-a-number", lambda t: lambda: load_judgments(
        _write(t / "j.csv", "\n".join([*JUDGMENTS, "coffee mug,a1,high"]))),
         CatalogError, ("j.csv:5", "field 'grade'", "not a grade: 'high'", "label map")),
    Case("judgments-grade-negative", lambda t: lambda: load_judgments(
        _write(t / "j.csv", "\n".join([*JUDGMENTS, "coffee mug,a1,-1"]))),
         CatalogError, ("j.csv:5", "field 'grade'", "negative grade -1")),
    Case("judgments-grade-above-max-grade", lambda t: lambda: load_judgments(
        _write(t / "j.csv", "\n".join([*JUDGMENTS, "coffee mug,a1,9"])), max_grade=6),
         CatalogError, ("j.csv:5", "field 'grade'", "grade 9 outside 0..6")),
    Case("judgments-bad-label-map", lambda t: lambda: parse_label_map("E=3,S=high"),
         CatalogError, ("--label-map E=3,S=high", "field 'S'", "grade must be a number")),
    Case("judgments-conflicting-grades", lambda t: lambda: load_judgments(
        _write(t / "j.csv", "\n".join([*JUDGMENTS, "red t-shirt,a1,0"]))),
         CatalogError, ("j.csv:5", "field 'grade'", "conflicting grade", "line 2")),
    Case("judgments-empty-query", lambda t: lambda: load_judgments(
        _write(t / "j.csv", "\n".join([*JUDGMENTS, ",a1,1"]))),
         CatalogError, ("j.csv:5", "field 'query'", "empty")),
    Case("judgments-jsonl-invalid-json", lambda t: lambda: load_judgments(
        _jsonl(t, ['{"query": "mug", "item_id": "a3", "grade": 3}', "{oops"], name="j.jsonl")),
         CatalogError, ("j.jsonl:2", "(json)")),
    Case("judgments-unknown-item", lambda t: _evaluate(t, [*JUDGMENTS[:2], "red t-shirt,zz9,1", *JUDGMENTS[2:]]),
         JudgmentsError, ("judgments.csv:3", "field 'item_id'", "unknown item_id 'zz9'", "catalog.csv")),
    Case("judgments-none", lambda t: _evaluate(t, JUDGMENTS[:1]), JudgmentsError, ("judgments.csv", "no judgments")),
    # configs and scenario files -----------------------------------------------------------------------------
    Case("scenario-unknown-key", lambda t: _scenario_config(_scenario(t, "[train]\nlearning-rate = 0.1\n")),
         ConfigError, ("bad.toml", "unknown config key 'train.learning-rate'")),
    Case("scenario-unknown-section", lambda t: _scenario_config(_scenario(t, "[optimizer]\nlr = 0.1\n")),
         ConfigError, ("bad.toml", "unknown config key 'optimizer.lr'")),
    Case("scenario-wrong-type", lambda t: _scenario_config(_scenario(t, '[train]\nlr = "fast"\n')),
         ConfigError, ("bad.toml", "train.lr expects float", "'fast'")),
    Case("scenario-list-value", lambda t: _scenario_config(_scenario(t, '[strategy]\nname = ["fedavg"]\n')),
         ConfigError, ("bad.toml", "strategy.name expects str")),
    Case("scenario-invalid-toml", lambda t: _scenario_config(_scenario(t, "[train]\nlr = \n")),
         ConfigError, ("bad.toml", "invalid TOML", "line 2")),
    Case("scenario-not-found", lambda t: _scenario_config(t / "nosuch.toml"),
         ConfigError, ("nosuch.toml", "not found", "available", "smoke")),
    Case("scenario-value-out-of-range", lambda t: _scenario_config(_scenario(t, '[model]\nfusion = "mlp"\n')),
         ConfigError, ("model.fusion", "'mlp' is not one of",)),
    Case("run-config-unknown-key", lambda t: lambda: merge_overrides(load_defaults(), {"train.lrate": 0.1},
                                                                     "run config"),
         ConfigError, ("run config", "unknown config key 'train.lrate'")),
    Case("run-config-wrong-type", lambda t: lambda: merge_overrides(load_defaults(), {"server.num-rounds": "3"},
                                                                    "run config"),
         ConfigError, ("run config", "server.num-rounds expects int", "'3'")),
    Case("run-config-unknown-section", lambda t: lambda: parse_run_config({"optim.lr": 0.1}),
         ConfigError, ("unknown config keys ['optim.lr']",)),
    Case("run-config-negative-lr", lambda t: lambda: parse_run_config({"train.lr": -1.0}),
         ConfigError, ("train.lr must be positive",)),
    Case("set-without-value", lambda t: lambda: _parse_sets(["train.lr"]),
         ValueError, ("--set 'train.lr'", "KEY=VALUE")),
    # checkpoints ---------------------------------------------------------------------------------------------
    Case("checkpoint-garbage", lambda t: lambda: load_checkpoint(_write(t / "head.pt", b"\x00not a checkpoint")),
         CheckpointError, ("head.pt", "cannot read checkpoint")),
    Case("checkpoint-foreign", lambda t: lambda: load_checkpoint(_torch_save(t / "head.pt", {"weights": 1})),
         CheckpointError, ("head.pt", "not a fedrank checkpoint")),
    Case("checkpoint-missing", lambda t: lambda: load_checkpoint(t / "head.pt"),
         CheckpointError, ("head.pt", "no such checkpoint")),
    Case("export-from-garbage-checkpoint", lambda t: _export(_write(t / "head.pt", b"junk"), t / "bundle"),
         ExportError, ("head.pt", "cannot read checkpoint")),
    # bundles -------------------------------------------------------------------------------------------------
    Case("bundle-no-directory", lambda t: lambda: Reranker.load(t / "nothing"),
         BundleError, ("nothing", "no such bundle")),
    Case("bundle-no-manifest", lambda t: lambda: read_manifest(_write(t / "b" / "x.txt", "").parent),
         BundleError, ("manifest.json", "cannot read the manifest")),
    Case("bundle-manifest-not-json", lambda t: _manifest_text(t, "{format: fedrank"),
         BundleError, ("manifest.json", "not valid JSON")),
    Case("bundle-manifest-other-format", lambda t: _edit_manifest(t, _set("format", "onnx-zoo")),
         BundleError, ("manifest.json", "not a fedrank-bundle manifest")),
    Case("bundle-manifest-future-version", lambda t: _edit_manifest(t, _set("format_version", 99)),
         BundleError, ("manifest.json", "version 99 is not supported")),
    Case("bundle-manifest-missing-key", lambda t: _edit_manifest(t, _set("files", _DELETE)),
         BundleError, ("manifest.json", "missing key 'files'")),
    Case("bundle-manifest-files-not-an-object", lambda t: _edit_manifest(t, _set("files", ["head.int8.onnx"])),
         BundleError, ("manifest.json", "key 'files' must be")),
    Case("bundle-manifest-tokenizer-without-file", lambda t: _edit_manifest(t, _set("tokenizer", {"max_length": 64})),
         BundleError, ("manifest.json", "key 'tokenizer' must be", "'file'")),
    Case("bundle-manifest-unlisted-file", lambda t: _edit_manifest(
        t, lambda m: m["components"]["head"]["files"].update(onnx="head.fp64.onnx")),
         BundleError, ("manifest.json", "components.head.files.onnx", "'head.fp64.onnx'")),
    Case("bundle-file-missing", _bundle_missing_file, BundleError, ("head.", ".onnx: missing from the bundle")),
    Case("bundle-file-corrupt", _bundle_corrupt_file, BundleError, ("head.", ".onnx: sha256 mismatch")),
    Case("bundle-catalog-garbage-unverified", _bundle_garbage_catalog, BundleError,
         ("catalog.npz", "cannot read the catalog")),
    Case("bundle-manifest-item-ids-swapped", lambda t: _edit_manifest(t, _swap_item_ids, reseal=False),
         BundleError, ("manifest.json", "sha256 mismatch", "manifest.sha256")),
    Case("bundle-manifest-digest-truncated", lambda t: _manifest_digest(t, "{sha:.32}  manifest.json\n"),
         BundleError, ("manifest.sha256", "64 hex digits")),
    Case("bundle-manifest-digest-missing", lambda t: _manifest_digest(t, None),
         BundleError, ("manifest.sha256", "missing from the bundle", "re-export")),
    Case("bundle-written-by-format-1", lambda t: _manifest_digest(t, None, version=1),
         BundleError, ("manifest.json", "version 1 is not supported", "re-export")),
    Case("bundle-manifest-duplicate-item-id", lambda t: _edit_manifest(t, _duplicate_item_id),
         BundleError, ("manifest.json", "catalog.item_ids", "duplicate")),
    # id files (fedrank rerank --candidates / --recent) -------------------------------------------------------
    Case("id-file-score-not-a-number", lambda t: _id_file(t, "i1\t0.5\ni2\tabc\n"),
         RerankInputError, ("--candidates", "c.txt:2", "field 'score'", "not a number: 'abc'")),
    Case("id-file-score-on-some-lines-only", lambda t: _id_file(t, "i1\t0.5\ni2\n"),
         RerankInputError, ("c.txt:2", "field 'score'", "line 1")),
    Case("id-file-recent-with-a-tab", lambda t: _id_file(t, "i1\ni2\t0.5\n", "--recent", False, "r.txt"),
         RerankInputError, ("--recent", "r.txt:2", "field 'item_id'", "holds a TAB")),
    Case("id-file-not-utf8", lambda t: _id_file(t, b"i1\ncaf\xe9\n"),
         RerankInputError, ("--candidates", "c.txt", "UTF-8")),
]


def _prepare(data_dir: Path) -> Callable[[], object]:
    from shared_model.prepared import prepare

    return lambda: prepare(data_dir, progress=False)


def _parse_sets(items: list[str]) -> Any:
    from shared_model.console import parse_sets as parse

    return parse(items)


def _torch_save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def _export(checkpoint: Path, out: Path) -> Callable[[], object]:
    from export.bundle import export_from_checkpoint

    return lambda: export_from_checkpoint(checkpoint, out)


def test_case_ids_are_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_raises_a_typed_error_naming_the_place(case: Case, tmp_path: Path) -> None:
    # Prepare
    call = case.make(tmp_path)
    # Execute
    with pytest.raises(case.exc) as info:
        call()
    # Assert: the type exactly (not a broader parent), and every name in the message
    assert type(info.value) is case.exc, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    missing = [n for n in case.names if n not in message]
    assert not missing, f"message {message!r} lacks {missing}"


def test_nothing_is_written_when_judgments_are_bad(tmp_path: Path) -> None:
    call = _evaluate(tmp_path, [*JUDGMENTS, "coffee mug,a1,high"])
    with pytest.raises(CatalogError):
        call()
    assert not (tmp_path / "eval").exists()


def test_skip_bad_skips_unknown_judged_items(tmp_path: Path) -> None:
    # with --skip-bad, an unknown item is a skipped row, as a malformed one is
    cat = _csv(tmp_path, ROWS)
    judg = _write(tmp_path / "judgments.csv", "\n".join([*JUDGMENTS, "red t-shirt,zz9,1"]) + "\n")
    assert load_judgments(judg, skip_bad=True, catalog=load_catalog(cat)) == [
        ("red t-shirt", "a1", 3), ("red t-shirt", "a2", 1), ("coffee mug", "a3", 3)]


# ------------------------------------------------------------------------------------------ the CLI


@dataclass
class CliCase:
    """``make(tmp)`` returns (argv, files that must not exist afterwards, files that must be left untouched)."""

    id: str
    make: Callable[[Path], tuple[list[str], list[Path], list[Path]]]
    names: tuple[str, ...]


def _cli_generate(t: Path) -> tuple[list[str], list[Path], list[Path]]:
    cat = _csv(t, _replace(ROWS, 1, "a2,blue cotton t-shirt,,tshirt,acme,blue,twelve,4.5,,"))
    out = t / "market"
    meta = _write(out / "meta.json", '{"from": "an earlier run"}')  # an existing folder stays as it was
    return ["generate", "--catalog", str(cat), "--out", str(out), "--preset", "tiny"], [out / "sessions.npz"], [meta]


def _cli_generate_foreign_out(t: Path) -> tuple[list[str], list[Path], list[Path]]:
    # the folder is replaced whole: one that fedrank generate did not write is refused, not emptied
    notes = _write(t / "shop" / "notes.txt", "the shop's own file")
    return ["generate", "--preset", "tiny", "--out", str(t / "shop")], [t / "shop" / "meta.json"], [notes]


def _cli_generate_out_is_file(t: Path) -> tuple[list[str], list[Path], list[Path]]:
    out = _write(t / "market", "a file, not a folder")
    return ["generate", "--catalog", str(_csv(t, ROWS)), "--out", str(out), "--preset", "tiny"], [], [out]


def _cli_train(t: Path) -> tuple[list[str], list[Path], list[Path]]:
    d = _data_dir(t)
    _write(d / "sessions.npz", _log_file(t / "x").read_bytes()[:200])
    return ["train", "--data", str(d), "--out", str(t / "run")], [t / "run", d / "propensity.json"], []


def _cli_evaluate(t: Path) -> tuple[list[str], list[Path], list[Path]]:
    cat = _csv(t, ROWS)
    judg = _write(t / "judgments.csv", "\n".join([*JUDGMENTS, "coffee mug,a1,-1"]) + "\n")
    res = _write(t / "eval" / "results.json", '{"rankers": {}}')
    return (["evaluate", "--catalog", str(cat), "--judgments", str(judg), "--out", str(t / "eval")],
            [t / "eval" / "cache"], [res])


def _cli_evaluate_checkpoint(t: Path) -> tuple[list[str], list[Path], list[Path]]:
    ckpt = _write(t / "garbage.pt", b"PK\x03\x04 not really")
    return ["evaluate", "--checkpoint", str(ckpt), "--data", str(t / "data"), "--out", str(t / "ev")], [t / "ev"], []


def _cli_simulate(text: str, *extra: str) -> Callable[[Path], tuple[list[str], list[Path], list[Path]]]:
    def make(t: Path) -> tuple[list[str], list[Path], list[Path]]:
        path = _scenario(t, text)
        return ["simulate", "--scenario", str(path), "--out", str(t / "run"), *extra], [t / "run"], []
    return make


def _cli_resume(t: Path) -> tuple[list[str], list[Path], list[Path]]:
    (t / "run").mkdir()
    return ["simulate", "--resume", str(t / "run")], [t / "run" / "results.json"], []


def _cli_export(t: Path) -> tuple[list[str], list[Path], list[Path]]:
    ckpt = _write(t / "head.pt", b"junk")
    return ["export", "--checkpoint", str(ckpt), "--out", str(t / "bundle")], [t / "bundle"], []


def _cli_rerank(t: Path) -> tuple[list[str], list[Path], list[Path]]:
    b = _bundle_copy(t)
    (b / _head_file(b)).unlink()
    cands = _write(t / "c.txt", "i1\ni2\n")
    return ["rerank", "--bundle", str(b), "--query", "red shirt", "--candidates", str(cands)], [], [cands]


def _cli_rerank_candidates(t: Path) -> tuple[list[str], list[Path], list[Path]]:
    return ["rerank", "--bundle", str(t), "--query", "q", "--candidates", str(t / "nope.txt")], [], []


def _cli_rerank_bad_score(t: Path) -> tuple[list[str], list[Path], list[Path]]:
    b = _bundle_copy(t)
    cands = _write(t / "c.txt", "i1\t0.5\ni2\tabc\n")
    return ["rerank", "--bundle", str(b), "--query", "red shirt", "--candidates", str(cands)], [], [cands]


def _cli_rerank_tampered_manifest(t: Path) -> tuple[list[str], list[Path], list[Path]]:
    b = _bundle_copy(t)
    man = json.loads((b / "manifest.json").read_text())
    _swap_item_ids(man)
    (b / "manifest.json").write_text(json.dumps(man, indent=1))
    cands = _write(t / "c.txt", "i1\ni2\n")
    return ["rerank", "--bundle", str(b), "--query", "red shirt", "--candidates", str(cands)], [], []


CLI_CASES = [
    CliCase("generate-bad-catalog", _cli_generate, ("catalog.csv:3", "field 'price'")),
    CliCase("generate-out-holds-other-files", _cli_generate_foreign_out, ("--out", "notes.txt", "did not write")),
    CliCase("generate-out-is-a-file", _cli_generate_out_is_file, ("--out", "market", "not a folder")),
    CliCase("train-truncated-log", _cli_train, ("sessions.npz", "not a readable .npz")),
    CliCase("evaluate-bad-judgments", _cli_evaluate, ("judgments.csv:5", "field 'grade'")),
    CliCase("evaluate-garbage-checkpoint", _cli_evaluate_checkpoint, ("garbage.pt", "cannot read checkpoint")),
    CliCase("simulate-unknown-key", _cli_simulate("[train]\nlearning-rate = 0.1\n"),
            ("bad.toml", "train.learning-rate")),
    CliCase("simulate-invalid-toml", _cli_simulate("[train\n"), ("bad.toml", "invalid TOML")),
    CliCase("simulate-set-wrong-type", _cli_simulate("", "--set", "train.lr=fast"),
            ("command line", "train.lr expects float")),
    CliCase("simulate-set-without-value", _cli_simulate("", "--set", "train.lr"), ("--set 'train.lr'",)),
    CliCase("simulate-resume-without-checkpoint", _cli_resume, ("last.pt", "no such checkpoint")),
    CliCase("export-garbage-checkpoint", _cli_export, ("head.pt", "cannot read checkpoint")),
    CliCase("rerank-bundle-missing-file", _cli_rerank, ("head.", "missing from the bundle")),
    CliCase("rerank-no-candidates-file", _cli_rerank_candidates, ("--candidates", "nope.txt")),
    CliCase("rerank-candidates-bad-score", _cli_rerank_bad_score, ("--candidates", "c.txt:2", "not a number")),
    CliCase("rerank-manifest-item-ids-swapped", _cli_rerank_tampered_manifest, ("manifest.json", "sha256 mismatch")),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_prints_one_line_and_exits_2(case: CliCase, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    argv, absent, intact = case.make(tmp_path)
    before = {p: p.read_bytes() for p in intact}
    # Execute
    rc = main(argv)
    # Assert
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("fedrank ")]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in case.names), lines[0]
    assert not [p for p in absent if p.exists()], "a failing command left output behind"
    assert {p: p.read_bytes() for p in intact} == before, "a failing command changed an existing file"
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left behind"
    assert not [p for pat in (".*.lock", ".*.staging-*") for p in tmp_path.rglob(pat)], "a lock or staging was left"


# ids are data, not words: BOM, CRLF, spaces inside ids, blank lines, duplicates (first occurrence wins)
SPACED = {"i0": "red shoe 1", "i1": "blue  hat"}


@pytest.mark.parametrize("skip_unknown", [False, True], ids=["strict", "skip-unknown"])
@pytest.mark.parametrize("with_scores", [False, True], ids=["ids", "ids-and-scores"])
def test_cli_rerank_reads_id_files_as_data(tmp_path: Path, capsys: pytest.CaptureFixture[str], skip_unknown: bool,
                                           with_scores: bool) -> None:
    # Prepare: a BOM, CRLF line ends, ids holding spaces, padding, blank lines and two duplicates
    b = _bundle_with_ids(tmp_path, SPACED)
    col = ["\t0.9", "\t0.5", "\t0.1", "\t0.2", "\t0.3"] if with_scores else [""] * 5
    lines = [f"red shoe 1{col[0]}", f"  i2 {col[1]}", "", f"blue  hat{col[2]}", "   ", f"i2{col[3]}",
             f"red shoe 1{col[4]}"]
    cands = _write(tmp_path / "c.txt", b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    recent = _write(tmp_path / "r.txt", b"\xef\xbb\xbfblue  hat\nred shoe 1\nblue  hat\n")
    argv = ["rerank", "--bundle", str(b), "--query", "red shoes", "--candidates", str(cands), "--recent",
            str(recent), "--json", *(["--skip-unknown"] if skip_unknown else [])]
    # Execute
    rc = main(argv)
    # Assert: each id printed once, none dropped, each duplicate named with its line on stderr
    out, err = capsys.readouterr()
    assert rc == 0, err
    printed = [r["item_id"] for r in json.loads(out)]
    assert sorted(printed) == sorted(["red shoe 1", "i2", "blue  hat"]), printed
    assert f"{cands}:6: duplicate id 'i2' (first on line 2)" in err, err
    assert f"{cands}:7: duplicate id 'red shoe 1' (first on line 1)" in err, err
    assert f"{recent}:3: duplicate id 'blue  hat' (first on line 1)" in err, err


def test_cli_rerank_space_holding_ids_match_a_python_call(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    # Prepare
    b = _bundle_with_ids(tmp_path, SPACED)
    cands = _write(tmp_path / "c.txt", "red shoe 1\t1.5\ni2\t0.5\nblue  hat\t-1\n")
    want = Reranker.load(b).rerank("red shoes", ["red shoe 1", "i2", "blue  hat"], retrieval_scores=[1.5, 0.5, -1])
    # Execute
    rc = main(["rerank", "--bundle", str(b), "--query", "red shoes", "--candidates", str(cands), "--json"])
    # Assert: the scores column reached the head with the right ids
    out = capsys.readouterr().out
    assert rc == 0
    assert [(r["item_id"], r["score"]) for r in json.loads(out)] == [(i, pytest.approx(s)) for i, s in want]


def test_cli_rerank_table_prints_ids_verbatim(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: an id that rich would read as markup
    b = _bundle_with_ids(tmp_path, {"i0": "[red]shoe[/red] 1"})
    cands = _write(tmp_path / "c.txt", "[red]shoe[/red] 1\ni2\n")
    # Execute
    rc = main(["rerank", "--bundle", str(b), "--query", "red shoes", "--candidates", str(cands)])
    # Assert
    assert rc == 0 and "[red]shoe[/red] 1" in capsys.readouterr().out


def test_fedrank_process_exits_2_without_a_traceback(tmp_path: Path) -> None:
    """``fedrank``'s main in its own process (what the console script runs)."""
    bad = _scenario(tmp_path, '[strategy]\nfraction-train = "all"\n')
    proc = subprocess.run([sys.executable, "-m", "fedrank.cli", "simulate", "--scenario", str(bad)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fedrank simulate: error: scenario {bad}: strategy.fraction-train expects float, got 'all'")

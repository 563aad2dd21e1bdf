"""Checkpoint directories on disk: ``latest`` resolved, complete ones verified, damaged or partial ones clear
errors."""
from __future__ import annotations

import json

import pytest

from megatron_opsd.fileio import MANIFEST, CheckpointError, verify_manifest
from megatron_opsd.train.checkpoint import LATEST, resolve


def _complete(root, name="step_000003"):
    ckpt = root / name
    ckpt.mkdir(parents=True)
    (ckpt / "__0_0.distcp").write_bytes(b"x" * 10)
    (ckpt / MANIFEST).write_text(json.dumps({"__0_0.distcp": 10}))
    (root / LATEST).write_text(name)
    return ckpt


def test_resolve_follows_latest_and_verify_accepts_complete(tmp_path):
    ckpt = _complete(tmp_path)
    assert resolve(tmp_path) == ckpt
    verify_manifest(ckpt)
    assert resolve(tmp_path / "empty") is None


def test_damaged_or_partial_checkpoints_are_clear_errors(tmp_path):
    ckpt = _complete(tmp_path)
    (ckpt / "__0_0.distcp").write_bytes(b"x" * 4)
    with pytest.raises(CheckpointError, match="damaged: __0_0.distcp has 4 bytes, expected 10"):
        verify_manifest(ckpt)
    (ckpt / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="damaged: __0_0.distcp is missing"):
        verify_manifest(ckpt)
    (ckpt / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete: no manifest.json"):
        verify_manifest(ckpt)
    (tmp_path / LATEST).write_text("step_000009")
    with pytest.raises(CheckpointError, match="names step_000009, which does not exist"):
        resolve(tmp_path)
    (tmp_path / LATEST).unlink()
    with pytest.raises(CheckpointError, match="no 'latest' pointer"):
        resolve(tmp_path)

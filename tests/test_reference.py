"""The committed reference model (compactvl.reference): its file checks, its offline rebuild (bit-identical to the
recorded one), and the name ``reference`` wherever a model directory is taken."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compactvl import reference
from compactvl.errors import CheckpointError, ConfigError
from compactvl.manifest import sha256_file
from compactvl.model import WEIGHTS_NAME, CompactVLM


@pytest.fixture
def copied(tmp_path):
    """The committed files, copied where a test may damage them."""
    w, i = tmp_path / reference.WEIGHTS.name, tmp_path / reference.INFO.name
    shutil.copy(reference.WEIGHTS, w)
    shutil.copy(reference.INFO, i)
    return w, i


def test_committed_files_are_intact_and_small():
    info = reference.read_info()
    reference.verify_weights()  # size and SHA-256 as recorded
    assert info["weights"]["bytes"] < 8 * 2**20  # a few MB: only the trained tensors are committed
    assert info["recipe_sha256"] == sha256_file(reference.recipe_path(reference.NAME))
    assert set(load_file(str(reference.WEIGHTS))) == set(info["weights"]["tensors"])
    assert all(not k.startswith(reference.FROM_PARTS) for k in info["weights"]["tensors"])


def test_truncated_weights_are_named(copied):
    w, i = copied
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{w.name}.*truncated, extended or replaced.*git checkout"):
        reference.verify_weights(w, reference.read_info(i))


def test_flipped_byte_is_named(copied):
    w, i = copied
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{w.name}.*SHA-256"):
        reference.verify_weights(w, reference.read_info(i))
    with pytest.raises(CheckpointError, match=w.name):
        reference.build(w, i)  # checked before any model is assembled


def test_missing_and_malformed_record(copied, tmp_path):
    w, i = copied
    with pytest.raises(CheckpointError, match="missing"):
        reference.verify_weights(tmp_path / "absent.safetensors", reference.read_info(i))
    i.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=rf"{i.name}.*'weights'"):
        reference.read_info(i)


def test_changed_recipe_is_refused(copied):
    _, i = copied
    info = reference.read_info(i)
    info["recipe_sha256"] = "0" * 64
    with pytest.raises(ConfigError, match="changed since the reference weights were trained"):
        reference.recipe(info)


def test_export_needs_a_trained_run(tmp_path):
    with pytest.raises(CheckpointError, match="holds no trained model"):
        reference.export(tmp_path)


def test_resolve_leaves_other_paths_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert reference.resolve("runs/demo") == "runs/demo"
    (tmp_path / "reference").mkdir()  # a local folder named "reference" wins over the committed model
    assert reference.resolve("reference") == "reference"


@pytest.mark.slow
def test_rebuild_is_bit_identical(tmp_path, monkeypatch):
    """Two rebuilds hold the same tensors; the trained ones are the committed ones; the saved model file is
    byte-identical to the one recorded at export; ``resolve('reference')`` and ``from_pretrained`` read it."""
    a, b = reference.build(), reference.build()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    committed = load_file(str(reference.WEIGHTS))
    assert all(torch.equal(sa[k], v) for k, v in committed.items())
    assert a.token_ops.expected_tokens([256], [(16, 16)]) == 64  # the LM sees the 8x8 pooled grid
    del b
    monkeypatch.setattr(reference, "cache_dir", lambda info=None: tmp_path / "ref")
    monkeypatch.chdir(tmp_path)
    path = Path(reference.resolve("reference"))
    assert path == tmp_path / "ref"
    assert sha256_file(path / WEIGHTS_NAME) == reference.read_info()["model_sha256"]
    assert reference.materialize() == path  # rebuilt once: a second call reuses it
    loaded = CompactVLM.from_pretrained(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in committed.items())
    assert json.loads((path / "compactvl_config.json").read_text())["token_ops"] == [{"op": "avgpool", "k": 2}]

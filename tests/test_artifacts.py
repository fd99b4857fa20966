"""Damaged saved models and training checkpoints: every mutation of a file (deleted, truncated, emptied, a flipped
byte, appended bytes, JSON of the wrong type, an empty tokenizer config, a damaged manifest) ends in a
CheckpointError that names the damaged file — never a raw library error, never a model that loads with other
weights. Tiny random parts, one save each, copied per case."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from compactvl import manifest as manifest_mod
from compactvl.config import load_config
from compactvl.demo import tiny_model
from compactvl.errors import CheckpointError
from compactvl.manifest import MANIFEST, write_manifest
from compactvl.model import CompactVLM
from compactvl.train import Trainer, build_train_data, list_checkpoints, load_checkpoint


def _cfg(out: Path) -> dict:
    return load_config({"model": {"token_ops": [{"op": "avgpool", "k": 2}], "system_prompt": ""},
                        "data": {"train": [{"name": "synthvqa", "n": 8}]},
                        "train": {"stage": "sft", "batch_size": 8, "max_steps": 2, "warmup_steps": 1,
                                  "precision": "fp32", "feature_cache": "off"},
                        "output_dir": str(out)})


# ---------------------------------------------------------------- mutations
def _flip(at: float | int):
    def mutate(p: Path) -> None:
        b = bytearray(p.read_bytes())
        i = at if isinstance(at, int) else int(len(b) * at)
        b[min(i, len(b) - 1)] ^= 0xFF
        p.write_bytes(bytes(b))
    return mutate


def _same_size_list(p: Path) -> None:
    """The JSON object's values as a list, padded with spaces to the original size (a size check cannot see it)."""
    n = p.stat().st_size
    text = json.dumps(list(json.loads(p.read_text()).values()))[:n - 2]
    text = text if text.endswith("]") else "[0]"
    p.write_text(text.ljust(n))


MUTATIONS = {
    "delete": lambda p: p.unlink(),
    "truncate": lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "flip_first_bytes": _flip(8),  # a safetensors header, a pickle's zip header, the start of a JSON text
    "flip_middle": _flip(0.5),
    "flip_last": _flip(-1),
    "append": lambda p: p.write_bytes(p.read_bytes() + b"\x00junk"),
}
JSON_MUTATIONS = {
    "list_not_dict": lambda p: p.write_text(json.dumps(list(json.loads(p.read_text()).values()))),
    "list_same_size": _same_size_list,
    "empty_object": lambda p: p.write_text("{}"),  # for tokenizer_config.json: the empty tokenizer config
}


def _cases(files: list[str]) -> list[tuple[str, str]]:
    out = [(f, m) for f in files for m in MUTATIONS]
    out += [(f, m) for f in files if f.endswith(".json") for m in JSON_MUTATIONS]
    return out


def _mutate(path: Path, name: str, how: str) -> None:
    target = path / name
    before = target.read_bytes()
    {**MUTATIONS, **JSON_MUTATIONS}[how](target)
    assert not target.exists() or target.read_bytes() != before, (name, how)  # the mutation did change something


# ---------------------------------------------------------------- a saved model
MODEL_FILES = ["compactvl_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MANIFEST]
MODEL_CASES = _cases(MODEL_FILES)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "model"
    model = tiny_model(_cfg(path.parent))
    torch.nn.init.normal_(model.projector.net[0].weight)  # something a wrong load would change
    model.save_pretrained(path)
    assert sorted(p.name for p in path.iterdir()) == sorted(MODEL_FILES)
    return path


def test_a_saved_model_has_a_manifest_and_loads(saved_model):
    files = json.loads((saved_model / MANIFEST).read_text())["files"]
    assert sorted(files) == sorted(set(MODEL_FILES) - {MANIFEST})
    assert all(files[f]["bytes"] == (saved_model / f).stat().st_size for f in files)
    CompactVLM.from_pretrained(saved_model, verify=True)


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("name, how", MODEL_CASES)
def test_every_damage_to_a_saved_model_is_a_checkpoint_error_naming_the_file(saved_model, tmp_path, name, how,
                                                                             verify):
    path = tmp_path / "model"
    shutil.copytree(saved_model, path)
    _mutate(path, name, how)
    with pytest.raises(CheckpointError) as err:
        CompactVLM.from_pretrained(path, verify=verify)
    assert name in str(err.value)


@pytest.mark.parametrize("name, how", [c for c in MODEL_CASES if c[0] != MANIFEST and c[1] != "delete"])
def test_damage_behind_a_matching_manifest_is_still_never_a_raw_error(saved_model, tmp_path, name, how):
    """A directory damaged before its manifest was written (the manifest matches): loading either works or fails
    with a CheckpointError naming the file — never a raw SafetensorError / JSONDecodeError / AttributeError. (A
    file deleted before the manifest was written is not known to be missing: the other tests cover deletion.)"""
    path = tmp_path / "model"
    shutil.copytree(saved_model, path)
    _mutate(path, name, how)
    write_manifest(path)
    try:
        CompactVLM.from_pretrained(path)
    except CheckpointError as e:
        assert name in str(e)


def test_a_flipped_byte_in_large_weights_is_found_by_verify(saved_model, tmp_path, monkeypatch):
    """Weights above ``HASH_ALWAYS_BELOW`` are only size-checked by default (hashing them reads them twice);
    ``verify=True`` hashes them too and finds a flipped byte the size check cannot see."""
    monkeypatch.setattr(manifest_mod, "HASH_ALWAYS_BELOW", 0)  # every file counts as large
    path = tmp_path / "model"
    shutil.copytree(saved_model, path)
    _mutate(path, "model.safetensors", "flip_last")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged: its SHA-256 differs"):
        CompactVLM.from_pretrained(path, verify=True)
    _mutate(path, "model.safetensors", "append")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged: \d+ bytes"):
        CompactVLM.from_pretrained(path)  # the size is checked always


def test_a_file_added_after_saving_that_the_loader_would_read_is_refused(saved_model, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(saved_model, path)
    (path / "added_tokens.json").write_text('{"<new>": 999}')
    with pytest.raises(CheckpointError, match="added_tokens.json is not in manifest.json"):
        CompactVLM.from_pretrained(path)
    (path / "added_tokens.json").unlink()
    (path / "README.md").write_text("notes")  # a file the loader does not read is fine
    CompactVLM.from_pretrained(path)


def test_a_model_without_a_manifest_is_refused_and_write_manifest_readmits_it(saved_model, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(saved_model, path)
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing.*write_manifest"):
        CompactVLM.from_pretrained(path)
    write_manifest(path)
    CompactVLM.from_pretrained(path, verify=True)


# ---------------------------------------------------------------- a training checkpoint
CKPT_FILES = ["trainable.safetensors", "state.pt", "trainer_state.json", "config.yaml", MANIFEST]
CKPT_CASES = _cases(CKPT_FILES) + [("config.yaml", "yaml_list")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = _cfg(out)
    trainer = Trainer(tiny_model(cfg), build_train_data(cfg["data"]["train"]), cfg, output_dir=out, progress=False,
                      log=None)
    trainer.fit(stop_at=1)
    [path] = list_checkpoints(out)
    assert sorted(p.name for p in path.iterdir()) == sorted(CKPT_FILES)
    return path


def _damaged_copy(checkpoint, tmp_path, name: str, how: str):
    """A copy of the checkpoint with file ``name`` damaged ``how`` (a YAML list for ``yaml_list``)."""
    path = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, path)
    if how == "yaml_list":
        (path / name).write_text("- train\n- model\n")
    else:
        _mutate(path, name, how)
    return path


@pytest.mark.parametrize("name, how", CKPT_CASES)
def test_every_damage_to_a_checkpoint_is_a_checkpoint_error_naming_the_file(checkpoint, tmp_path, name, how):
    path = _damaged_copy(checkpoint, tmp_path, name, how)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert name in str(err.value)


@pytest.mark.parametrize("name, how", [c for c in CKPT_CASES if c[0] != MANIFEST])
def test_checkpoint_damage_behind_a_matching_manifest_is_still_never_a_raw_error(checkpoint, tmp_path, name, how):
    path = _damaged_copy(checkpoint, tmp_path, name, how)
    write_manifest(path)
    try:
        load_checkpoint(path)
    except CheckpointError as e:
        assert name in str(e)


def test_an_intact_checkpoint_loads(checkpoint):
    weights, state, meta = load_checkpoint(checkpoint)
    assert weights and state["step"] == meta["step"] == 1

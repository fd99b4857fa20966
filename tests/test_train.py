"""Tests for compactvl.train: loss, learning, exact resume, data parallel equality, checkpoint safety, the feature
cache, LoRA export, and the errors bad input gets. Tiny random parts only (seconds)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from compactvl.config import load_config, save_config
from compactvl.data import Sample, SynthVQA
from compactvl.demo import tiny_model
from compactvl.encoders import tiny_encoder
from compactvl.errors import CheckpointError, ConfigError, InputError
from compactvl.model import CompactVLM
from compactvl.device import resolve_precision
from compactvl.losses import next_token_loss
from compactvl.train import (FeatureCache, Trainer, build_train_data, collate, list_checkpoints, load_checkpoint,
                             lr_factor)
from compactvl.train import checkpoint as checkpoint_mod
from compactvl.train.trainable import configure_trainable



def tiny_cfg(out: Path | str = "runs/t", train: dict | None = None, data_n: int = 24, model: dict | None = None,
             **sections) -> dict:
    recipe = {
        "model": {"token_ops": [{"op": "avgpool", "k": 2}], "system_prompt": "", **(model or {})},
        "data": {"train": [{"name": "synthvqa", "n": data_n}]},
        "train": {"stage": "sft", "lr": 3e-3, "batch_size": 8, "max_steps": 6, "warmup_steps": 1,
                  "precision": "fp32", **(train or {})},
        "output_dir": str(out),
        **sections,
    }
    return load_config(recipe)


def run(cfg: dict, out: Path, **fit_kw):
    model = tiny_model(cfg)
    trainer = Trainer(model, build_train_data(cfg["data"]["train"]), cfg, output_dir=out, progress=False, log=None)
    return trainer, trainer.fit(**fit_kw)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- loss and learning
def test_forward_loss_terms_equal_the_loss_computed_by_hand_from_logits():
    """One loss path: ``forward`` with targets-only logits (what the trainer calls) gives the CE sum, token count and
    loss that the full logits give by hand (each row against the label of the next input token)."""
    cfg = tiny_cfg()
    model = tiny_model(cfg)
    b = collate([SynthVQA("train", size=4)[i] for i in range(4)])
    x = model.prepare(b.conversations, b.images, with_labels=True)
    full = model(x)
    out = model(x, return_logits=False)
    assert out.logits is None and out.aux_loss is None
    assert out.num_tokens == full.num_tokens == int((x.labels[:, 1:] != -100).sum())
    by_hand = torch.nn.functional.cross_entropy(full.logits[:, :-1].flatten(0, 1).float(), x.labels[:, 1:].flatten(),
                                                ignore_index=-100)
    torch.testing.assert_close(out.ce_sum / out.num_tokens, by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(full.loss, next_token_loss(full.logits, full.state.orig_index, x.labels),
                               rtol=1e-6, atol=1e-6)


def test_the_trainers_step_loss_is_the_forward_loss_computed_by_hand(tmp_path):
    """The loss the trainer logs for step 1 (accumulated over micro-batches, normalized by the batch's token count)
    equals mean next-token CE over the batch computed by hand from the logits of an identical model."""
    cfg = tiny_cfg(train={"max_steps": 1, "micro_batch_size": 4, "feature_cache": "off"})
    t, res = run(cfg, tmp_path)
    model = tiny_model(cfg)
    b = collate([t.data[i] for i in t.visited(0, 1, all_ranks=True)])
    with torch.no_grad():
        x = model.prepare(b.conversations, b.images, with_labels=True)
        logits = model(x).logits
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x.labels[:, 1:].flatten(),
                                                ignore_index=-100)
    assert abs(res.losses[0] - float(by_hand)) < 1e-5, (res.losses[0], float(by_hand))


def test_the_step_loss_splits_into_the_cross_entropy_and_the_auxiliary_losses_computed_by_hand(tmp_path):
    """With HTE experts the step loss is CE + the balance loss; ``aux_losses`` holds the second, and both equal an
    identical model's forward in training mode on the same batch."""
    cfg = tiny_cfg(train={"max_steps": 1, "feature_cache": "off", "stage": "align"}, model=HTE)
    t, res = run(cfg, tmp_path)
    model = tiny_model(cfg)
    configure_trainable(model, "align", None, False)  # the trainer's own set-up: the same modules train, the same in .train()
    model.train()
    model.encoders.train(False)
    b = collate([t.data[i] for i in t.visited(0, 1, all_ranks=True)])
    x = model.prepare(b.conversations, b.images, with_labels=True)
    out = model(x, return_logits=False)
    ce, aux = float(out.ce_sum.detach() / out.num_tokens), float(out.aux_loss.detach())
    assert aux > 0 and len(res.aux_losses) == 1
    assert abs(res.aux_losses[0] - aux) < 1e-5 and abs(res.losses[0] - (ce + aux)) < 1e-5, (res, ce, aux)
    logged = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert logged[-1]["aux_loss"] == res.aux_losses[0]


HTE = {"experts": [{"expert": "hte", "layers": "second_half", "num_experts": 2, "balance_weight": 0.1}]}
LORA = {"r": 8, "alpha": 32, "layers": [2, 3], "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}


# a random tiny LM: full fine-tuning learns the answers' text fast; a frozen LM leaves the projector little to move
@pytest.mark.parametrize("stage, lora, factor", [("align", None, 0.99), ("sft", None, 0.7), ("sft", LORA, 0.92)])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tmp_path, stage, lora, factor):
    cfg = tiny_cfg(train={"stage": stage, "lora": lora, "max_steps": 12, "lr": 1e-2, "batch_size": 8},
                   data_n=16)
    model = tiny_model(cfg)
    data = build_train_data(cfg["data"]["train"])
    b = collate([data[i] for i in range(8)])
    trainer = Trainer(model, data, cfg, output_dir=tmp_path, progress=False, log=None)

    def loss() -> float:
        with torch.no_grad():
            return float(model(model.prepare(b.conversations, b.images, with_labels=True)).loss)

    before = loss()  # LoRA adapters start at zero, so injecting them does not change this
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = trainer.fit(export=False)
    after = loss()
    assert after < factor * before, (before, after)
    assert out.losses[-1] < out.losses[0]
    for n, p in model.named_parameters():  # frozen parts did not move
        if not p.requires_grad and n in frozen:
            assert torch.equal(p, frozen[n]), n
    if stage == "align":
        assert all(n.startswith(("projector.", "token_ops.")) for n in trainer.names)
    elif lora is None:
        assert any(n.startswith("lm.") for n in trainer.names) and not any("encoders." in n for n in trainer.names)
    else:
        assert any("lora_" in n for n in trainer.names) and not any("lm." in n and "lora_" not in n
                                                                     for n in trainer.names)
        assert not any(".layers.0." in n or ".layers.1." in n for n in trainer.names)  # only layers 2, 3 adapted


def test_full_sft_gives_the_pretrained_lm_its_own_learning_rate(tmp_path):
    cfg = tiny_cfg(train={"stage": "sft", "lr": 1e-3, "lm_lr": 1e-5, "weight_decay": 0.1, "max_steps": 1},
                   model=HTE)
    t, _ = run(cfg, tmp_path)
    by_id = {id(p): n for n, p in t.model.named_parameters()}
    for g in t.opt.param_groups:
        names = [by_id[id(p)] for p in g["params"]]
        pretrained = [n.startswith("lm.") and ".experts." not in n and ".router." not in n for n in names]
        assert len(set(pretrained)) == 1, names  # groups never mix pretrained LM weights with new modules
        assert g["initial_lr"] == (1e-5 if pretrained[0] else 1e-3)
        assert g["weight_decay"] == (0.1 if all(t.model.get_parameter(n).ndim >= 2 for n in names) else 0.0)
    assert sum(len(g["params"]) for g in t.opt.param_groups) == len(t.names)


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, 2, 0.1) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[1:], f[2:]))
    assert lr_factor(10, 10, 2, 0.1) == pytest.approx(0.1)


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) in (None, torch.bfloat16)


# ---------------------------------------------------------------- resume and checkpoints
@pytest.mark.parametrize("train, model", [({"stage": "sft"}, None),
                                          ({"stage": "sft", "lora": {"r": 4}, "micro_batch_size": 4}, None),
                                          ({"stage": "align", "feature_cache": "off"}, None),
                                          ({"stage": "align", "micro_batch_size": 2}, HTE),  # + MoE balance loss
                                          ({"stage": "sft"}, {"projector": {"type": "mlp", "standardize": True}})])
def test_resume_equals_uninterrupted_run(tmp_path, train, model):
    cfg = tiny_cfg(train={"max_steps": 6, "save_every": 2, **train}, model=model)  # 24 samples / batch 8: 3 / epoch
    t_straight, straight = run(cfg, tmp_path / "straight")
    _, first = run(cfg, tmp_path / "resumed", stop_at=4)  # stops in the second epoch
    assert first.steps == 4 and first.model_dir is None
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-0000002", "step-0000004"]
    t_resumed, resumed = run(cfg, tmp_path / "resumed", resume=True)
    if model and "experts" in model:  # the experts train with the projector, the pretrained FFNs they wrap do not
        assert any(".experts." in n or ".router." in n for n in t_resumed.names)
        assert not any("global_ffn" in n for n in t_resumed.names)
    assert resumed.steps == 6 and resumed.model_dir is not None
    assert resumed.losses == straight.losses  # bit-identical, including the steps before the interruption
    assert resumed.aux_losses == straight.aux_losses and len(straight.aux_losses) == 6
    a, b = trainable(t_straight.model), trainable(t_resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_ctrl_c_stops_after_the_step_writes_a_checkpoint_and_resume_is_exact(tmp_path):
    """The first Ctrl-C (SIGINT) lets the step in progress finish, writes its checkpoint, does not export, and says
    how to resume; resuming then equals an uninterrupted run."""
    import os
    import signal

    cfg = tiny_cfg(train={"max_steps": 6})
    _, straight = run(cfg, tmp_path / "straight")
    said = []

    def ctrl_c_during_step_3(trainer, seconds):
        if trainer.step == 2:  # arrives while step 3 would start: the loop sees it before step 3
            os.kill(os.getpid(), signal.SIGINT)

    t = Trainer(tiny_model(cfg), build_train_data(cfg["data"]["train"]), cfg, output_dir=tmp_path / "cut",
                progress=False, log=said.append, on_step=ctrl_c_during_step_3)
    before = signal.getsignal(signal.SIGINT)
    cut = t.fit()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is only installed while training
    assert cut.interrupted and cut.steps == 2 and cut.model_dir is None
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-0000002"]
    assert any("stopping after this step" in m for m in said) and any("--resume" in m for m in said)
    _, resumed = run(cfg, tmp_path / "cut", resume=True)
    assert resumed.steps == 6 and not resumed.interrupted and resumed.losses == straight.losses


def test_cli_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    from compactvl.cli import main
    from compactvl.cli import macs as macs_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(macs_cli, "run", interrupted)
    assert main(["macs", "--llm", "llama-2-7b", "--visual", "1", "--text", "1"]) == 130
    err = capsys.readouterr().err
    assert "compactvl macs: interrupted" in err and "Traceback" not in err


def test_resume_refuses_a_changed_recipe(tmp_path):
    cfg = tiny_cfg(train={"max_steps": 4})
    run(cfg, tmp_path, stop_at=2)
    changed = tiny_cfg(train={"max_steps": 4, "lr": 1e-4})
    with pytest.raises(ConfigError, match=r"config changed \(train\.lr: 0\.003 -> 0\.0001\).*new output_dir"):
        run(changed, tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="not a complete training checkpoint"):
        run(cfg, tmp_path, resume=tmp_path / "nowhere")


def test_failure_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = tiny_cfg(train={"max_steps": 4, "save_every": 2})
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 4) fails half-way: weights written, state not
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoint_mod.torch, "save", flaky_save)
    with pytest.raises(CheckpointError, match="previous checkpoint is intact"):
        run(cfg, tmp_path)
    monkeypatch.setattr(checkpoint_mod.torch, "save", real_save)
    ckpts = list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["step-0000002"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp leftovers
    weights, state, meta = load_checkpoint(ckpts[0])
    assert state["step"] == meta["step"] == 2 and weights
    # and the run continues from it to the same result as a clean run
    _, resumed = run(cfg, tmp_path, resume=True)
    _, clean = run(cfg, tmp_path / "clean")
    assert resumed.losses == clean.losses
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # steps 3-4 of the failed run were dropped, then redone
    assert [r["loss"] for r in log] == clean.losses


def test_a_full_disk_reported_by_safetensors_is_a_clear_checkpoint_error(tmp_path, monkeypatch):
    """safetensors raises its own SafetensorError (not an OSError) when the disk fills while it writes weights: the
    trainer still says which checkpoint failed, how much room is left and what to do, and keeps the previous one."""
    cfg = tiny_cfg(train={"max_steps": 4, "save_every": 2})
    real = checkpoint_mod.save_file
    calls = {"n": 0}

    def full(tensors, filename, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(checkpoint_mod, "save_file", full)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-0000004: .*No space left on device"
                                              r".* \([0-9,]+ MiB free on its disk\); the previous checkpoint is "
                                              r"intact .* then --resume"):
        run(cfg, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def _flip_last_byte(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[-1] ^= 0xFF
    path.write_bytes(bytes(b))


def _log_steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_resume_falls_back_past_a_damaged_newest_checkpoint_and_says_which_and_why(tmp_path):
    cfg = tiny_cfg(train={"max_steps": 6, "save_every": 2, "keep_last": 2})
    _, straight = run(cfg, tmp_path / "straight")
    out = tmp_path / "cut"
    run(cfg, out, stop_at=4)
    _flip_last_byte(out / "checkpoints" / "step-0000004" / "trainable.safetensors")  # a bit flip on disk
    said = []
    t = Trainer(tiny_model(cfg), build_train_data(cfg["data"]["train"]), cfg, output_dir=out, progress=False,
                log=said.append)
    t.fit(resume=True, stop_at=3)
    [skip] = [m for m in said if m.startswith("skipped checkpoint")]
    assert "step-0000004" in skip and "trainable.safetensors is damaged: its SHA-256 differs" in skip
    assert any(m.startswith("resumed from") and "step-0000002 at step 2" in m for m in said)
    # the next checkpoint written (step 3) removes the damaged one: it belonged to steps that are being redone
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002", "step-0000003"]
    _, resumed = run(cfg, out, resume=True)
    assert resumed.losses == straight.losses and _log_steps(out) == [1, 2, 3, 4, 5, 6]
    assert all(load_checkpoint(p) for p in list_checkpoints(out))


def test_resume_with_every_checkpoint_damaged_names_each_and_an_explicit_damaged_one_is_refused(tmp_path):
    cfg = tiny_cfg(train={"max_steps": 4, "save_every": 1, "keep_last": 2})
    run(cfg, tmp_path, stop_at=2)
    (tmp_path / "checkpoints" / "step-0000002" / "state.pt").unlink()
    (tmp_path / "checkpoints" / "step-0000001" / "trainer_state.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*step-0000002.*missing state.pt.*"
                                              r"step-0000001/trainer_state.json is damaged.*--overwrite"):
        run(cfg, tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="trainer_state.json is damaged"):  # a named one: no fallback
        run(cfg, tmp_path, resume=tmp_path / "checkpoints" / "step-0000001")


def test_temp_dirs_of_dead_processes_are_removed_at_start_and_live_ones_kept(tmp_path):
    cfg = tiny_cfg(train={"max_steps": 2, "save_every": 1})
    run(cfg, tmp_path, stop_at=1)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # its PID now names no process
    dead, live = p.pid, os.getpid()
    ckdir = tmp_path / "checkpoints"
    stale = [ckdir / f".step-0000002.tmp-{dead}", tmp_path / f".model.tmp-{dead}"]
    kept = [ckdir / f".step-0000009.tmp-{live}", tmp_path / ".mine"]  # a live writer's; a name we never write
    for d in stale + kept:
        d.mkdir()
        (d / "trainable.safetensors").write_bytes(b"x" * 100)
    _, res = run(cfg, tmp_path, resume=True)
    assert res.steps == 2 and not any(d.exists() for d in stale) and all(d.exists() for d in kept)


def test_a_torn_last_log_line_is_dropped_and_resume_logs_each_step_once(tmp_path):
    cfg = tiny_cfg(train={"max_steps": 4, "save_every": 2})
    _, straight = run(cfg, tmp_path / "straight")
    out = tmp_path / "cut"
    run(cfg, out, stop_at=3)  # checkpoints at 2 and 3; a kill while step 4's line was written leaves half a line
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.12')
    said = []
    t = Trainer(tiny_model(cfg), build_train_data(cfg["data"]["train"]), cfg, output_dir=out, progress=False,
                log=said.append)
    resumed = t.fit(resume=True)
    assert _log_steps(out) == [1, 2, 3, 4] and resumed.losses == straight.losses
    assert any("dropped 1 unreadable line(s)" in m for m in said)


KILLED_RUN = """
import os, signal, sys
from compactvl.config import load_config
from compactvl.demo import tiny_model
from compactvl.train import Trainer, build_train_data
from compactvl.train import checkpoint as checkpoint_mod

cfg = load_config(sys.argv[1])
where = sys.argv[2]
kill = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
real = checkpoint_mod.write_manifest
if where == "checkpoint":  # writing step-4: its files are in the temp dir, its manifest is not
    checkpoint_mod.write_manifest = lambda tmp: kill() if "step-0000004" in tmp.name else real(tmp)
on_step = (lambda t, s: kill() if t.step == 3 else None) if where == "step" else None
Trainer(tiny_model(cfg), build_train_data(cfg["data"]["train"]), cfg, progress=False, log=None, on_step=on_step).fit()
"""


@pytest.mark.parametrize("where, save_every", [("step", 0), ("checkpoint", 2)])
def test_a_killed_run_leaves_no_orphan_and_resume_logs_each_step_once(tmp_path, where, save_every):
    """SIGKILL (no clean-up possible) during step 3 before any checkpoint, or while checkpoint step-4 is written:
    the next start removes the dead process's temp dir, and --resume ends with each step logged once and the
    losses of an uninterrupted run."""
    cfg = tiny_cfg(tmp_path / "cut", train={"max_steps": 6, "save_every": save_every})
    _, straight = run(cfg, tmp_path / "straight")
    save_config(cfg, tmp_path)
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path / "config.yaml"), where],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    out = tmp_path / "cut"
    ckdir = out / "checkpoints"
    if where == "checkpoint":
        assert [p.name for p in ckdir.iterdir() if p.name.startswith(".step-0000004.tmp-")]  # the orphan
        assert _log_steps(out) == [1, 2, 3, 4]
    else:
        assert not ckdir.exists() and _log_steps(out) == [1, 2]
    _, resumed = run(cfg, out, resume=True)
    assert resumed.losses == straight.losses and _log_steps(out) == [1, 2, 3, 4, 5, 6]
    assert not [p for p in [*out.iterdir(), *ckdir.iterdir()] if p.name.startswith(".")]


def test_checkpoint_contents(tmp_path):
    cfg = tiny_cfg(train={"max_steps": 3, "stage": "align", "keep_last": 1, "save_every": 1})
    t, res = run(cfg, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003"]  # keep_last prunes older ones
    ck = res.checkpoint
    assert set(load_file(str(ck / "trainable.safetensors"))) == set(t.names)  # only trainable weights
    assert all(n.startswith("projector.") for n in t.names)
    state = torch.load(ck / "state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng", "step", "data", "losses"} <= set(state)
    assert state["data"] == {"seed": 0, "epoch": 1, "position": 0, "size": 24, "batch_size": 8}
    assert (ck / "config.yaml").is_file() and (tmp_path / "config.yaml").is_file()
    assert (res.model_dir / "config.yaml").is_file()
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and [r["loss"] for r in log] == res.losses


def test_exported_model_reloads_and_answers_the_same(tmp_path):
    cfg = tiny_cfg(train={"max_steps": 3, "lora": {"r": 4, "alpha": 16}})
    t, res = run(cfg, tmp_path)
    assert not any("lora_" in n for n, _ in t.model.named_parameters())  # adapters merged on export
    loaded = CompactVLM.from_pretrained(res.model_dir)
    b = collate([SynthVQA("test", size=3)[i] for i in range(3)], for_generation=True)
    t.model.eval()
    assert loaded.generate(b.conversations, b.images, 4) == t.model.generate(b.conversations, b.images, 4)


# ---------------------------------------------------------------- data parallel
def _dp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    # what torchrun / accelerate launch set: the trainer's Accelerator joins the (gloo) process group from these
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        cfg = tiny_cfg(out, train={"max_steps": 3, "micro_batch_size": 2, "stage": "sft"})
        trainer, res = run(cfg, Path(out))
        assert trainer.world == 2 and isinstance(trainer.ddp, torch.nn.parallel.DistributedDataParallel)
        if rank == 0:
            torch.save({"losses": res.losses, "weights": trainable(trainer.model)}, Path(out) / "dp.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_process_data_parallel_equals_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dp_worker, args=(2, port, str(tmp_path / "dp")), nprocs=2, join=True)
    dp = torch.load(tmp_path / "dp" / "dp.pt", weights_only=True)
    # one process, same global batch of 8, as 2 micro-batches of 4 (the DP run: 2 processes x 2 micro-batches of 2)
    cfg = tiny_cfg(tmp_path / "single", train={"max_steps": 3, "micro_batch_size": 4, "stage": "sft"})
    t, single = run(cfg, tmp_path / "single")
    assert len(dp["losses"]) == 3
    for a, b in zip(dp["losses"], single.losses):
        assert abs(a - b) < 1e-5, (dp["losses"], single.losses)
    w = trainable(t.model)
    assert w.keys() == dp["weights"].keys()
    for k in w:  # Adam divides by sqrt(v): where a gradient is ~0, summation-order noise moves a weight by up to
        # ~lr; the worst element seen differs by 2e-5 after 3 steps at lr 3e-3
        torch.testing.assert_close(dp["weights"][k], w[k], rtol=0, atol=1e-4)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    _, big = run(tiny_cfg(train={"max_steps": 2}), tmp_path / "a")
    _, acc = run(tiny_cfg(train={"max_steps": 2, "micro_batch_size": 2}), tmp_path / "b")
    for a, b in zip(big.losses, acc.losses):
        assert abs(a - b) < 1e-5


# ---------------------------------------------------------------- feature cache
def test_feature_cache_returns_what_the_encoder_computes():
    enc = tiny_encoder("dinov2", 32)
    model = tiny_model(tiny_cfg())
    model.encoders[0].load_state_dict(enc.state_dict())
    images = [SynthVQA("train", size=3)[i].images[0] for i in range(3)]
    cache = FeatureCache()
    view = cache.attach(model)
    calls = []

    def runner(subset):
        calls.append(len(subset))
        return enc(enc.preprocess(list(subset)), layers=[1, 3])

    ref = runner(images)
    calls.clear()
    first = view.lookup(0, images[:2], [1, 3], runner)
    torch.testing.assert_close(first.attention(3), ref.attention(3)[:2])  # from this call's fresh output
    again = view.lookup(0, [images[2], images[0], images[2]], [1, 3], runner)  # one new image, one duplicate
    assert calls == [2, 1] and cache.hits == 2 and cache.misses == 3 and len(cache) == 3
    for t in (1, 3):
        assert torch.equal(first.features[t], ref.features[t][:2])
        assert torch.equal(again.features[t], ref.features[t][[2, 0, 2]])
    assert torch.equal(again.cls, ref.cls[[2, 0, 2]]) and again.grid == ref.grid
    torch.testing.assert_close(again.attention(3), ref.attention(3)[[2, 0, 2]])
    assert calls == [2, 1]  # image 0's attention was stored, image 2's came with its fresh features
    torch.testing.assert_close(again.keys(2), ref.keys(2)[[2, 0, 2]])
    assert calls == [2, 1, 2]  # keys were never asked for: recomputed once for the two distinct images
    torch.testing.assert_close(view.lookup(0, images, [1, 3], runner).attention(3), ref.attention(3))
    assert calls == [2, 1, 2]  # everything now comes from the cache


def test_feature_cache_keys_on_encoder_weights():
    cfg = tiny_cfg()
    a, b = tiny_model(cfg), tiny_model(cfg)
    cache = FeatureCache()
    va, vb = cache.attach(a), cache.attach(b)
    assert va.fingerprints == vb.fingerprints  # same weights: shared entries
    with torch.no_grad():
        b.encoders[0].model.embeddings.patch_embeddings.projection.weight.mul_(2)
    assert cache.attach(b).fingerprints != va.fingerprints



def test_a_cache_shared_by_models_with_other_taps_returns_each_what_its_encoder_computes():
    """Two models on one encoder tap other layers: each lookup returns the features and CLS token at its own taps,
    as the encoder computes them (a CLS stored at another model's last tap is not returned for this one's)."""
    enc = tiny_encoder("dinov2", 32)
    model = tiny_model(tiny_cfg())
    model.encoders[0].load_state_dict(enc.state_dict())
    images = [SynthVQA("train", size=2)[i].images[0] for i in range(2)]
    view = FeatureCache().attach(model)

    def runner(subset, taps):
        return enc(enc.preprocess(list(subset)), layers=taps)

    deep = view.lookup(0, images, [1, 3], lambda s: runner(s, [1, 3]))
    shallow = view.lookup(0, images, [1], lambda s: runner(s, [1]))
    ref_deep, ref_shallow = runner(images, [1, 3]), runner(images, [1])
    assert ref_shallow.cls is not None and not torch.equal(ref_shallow.cls, ref_deep.cls)
    assert torch.equal(shallow.features[1], ref_shallow.features[1]) and torch.equal(shallow.cls, ref_shallow.cls)
    again = view.lookup(0, images, [1, 3], lambda s: pytest.fail("both taps' CLS are stored now"))
    assert torch.equal(again.cls, ref_deep.cls) and torch.equal(deep.cls, ref_deep.cls)


def test_retain_keeps_only_the_entries_of_a_models_encoders():
    cfg = tiny_cfg()
    a, b = tiny_model(cfg), tiny_model(cfg)
    with torch.no_grad():
        b.encoders[0].model.embeddings.patch_embeddings.projection.weight.mul_(2)
    cache = FeatureCache()
    images = [SynthVQA("train", size=2)[i].images[0] for i in range(2)]
    for m in (a, b):
        cache.attach(m)
        m.encode_images(images)
    assert len(cache) == 4
    assert cache.retain(b) == 2 and len(cache) == 2
    assert {k[0] for k in cache._store} == set(cache.attach(b).fingerprints)


def test_a_training_run_reads_a_shared_cache_and_trains_as_it_would_alone(tmp_path):
    """``Trainer(feature_cache=shared)``: a second run on the same encoder and images encodes nothing and its losses
    equal those of the same run with its own cache (and of one without any cache)."""
    shared = FeatureCache()
    cfg = tiny_cfg(train={"max_steps": 3, "feature_cache": "precompute"})
    first = Trainer(tiny_model(cfg), build_train_data(cfg["data"]["train"]), cfg, output_dir=tmp_path / "a",
                    progress=False, log=None, feature_cache=shared).fit()
    lines: list[str] = []
    second = Trainer(tiny_model(cfg), build_train_data(cfg["data"]["train"]), cfg, output_dir=tmp_path / "b",
                     progress=False, log=lines.append, feature_cache=shared).fit()
    _, alone = run(cfg, tmp_path / "c")
    assert first.cache["misses"] == 24 and second.cache["misses"] == 0 and second.cache["hits"] >= 24
    assert any(line.startswith("feature cache: 0 images") and "24 read from a cache shared" in line for line in lines)
    assert second.losses == alone.losses == first.losses

def test_training_with_and_without_cache_agree(tmp_path):
    _, cached = run(tiny_cfg(train={"max_steps": 3, "feature_cache": "precompute"}), tmp_path / "a")
    _, plain = run(tiny_cfg(train={"max_steps": 3, "feature_cache": "off"}), tmp_path / "b")
    assert cached.cache["images"] == 24 and cached.cache["hits"] >= 24 and not plain.cache
    for x, y in zip(cached.losses, plain.losses):
        assert abs(x - y) < 1e-5


def test_max_steps_bounds_what_is_encoded(tmp_path):
    """A short run encodes only the images of the samples it trains on, not the whole training set."""
    t, res = run(tiny_cfg(train={"max_steps": 1, "feature_cache": "precompute"}), tmp_path)
    seen = t.visited(0, 1)
    assert res.cache["images"] == len(seen) == t.t["batch_size"] < len(t.data)
    assert res.cache["misses"] == len(seen)


def test_projector_standardization_is_fitted_on_training_features(tmp_path):
    from compactvl.projectors import Standardize

    cfg = tiny_cfg(train={"max_steps": 1, "stage": "align"}, model={"projector": {"type": "mlp", "standardize": True}})
    t, res = run(cfg, tmp_path)
    std = t.model.projector.net[0]
    assert isinstance(std, Standardize) and bool(std.fitted)
    data = build_train_data(cfg["data"]["train"])
    seen = t.visited(0, t.total_steps, all_ranks=True)  # the samples the run trains on (< 512 of them)
    assert 0 < len(seen) < len(data)
    with torch.no_grad():  # the statistics are those of the projector inputs over the samples trained on
        _, mask, tokens = t.model.encode_images([data[i].images[0] for i in seen])
        x = tokens.x[mask]
    torch.testing.assert_close(std.mean, x.mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(std.std, x.std(0), rtol=1e-3, atol=1e-4)
    loaded = CompactVLM.from_pretrained(res.model_dir)  # saved with the weights, not refitted on load
    assert bool(loaded.projector.net[0].fitted) and torch.equal(loaded.projector.net[0].mean, std.mean)


# ---------------------------------------------------------------- bad input
def _llava(tmp_path: Path, records) -> Path:
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "red.png")
    p = tmp_path / "d.json"
    p.write_text(records if isinstance(records, str) else json.dumps(records))
    return p


def _rec(i: int, **kw) -> dict:
    return {"id": str(i), "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}], **kw}


def test_malformed_llava_records_fail_with_file_and_index_or_are_skipped_and_counted(tmp_path):
    good = [_rec(i) for i in range(8)]
    bad = good + [_rec(8, image="missing.png"),
                  {"id": "9", "image": "red.png", "conversations": []},
                  {"id": "10", "image": "red.png", "conversations": [{"from": "human", "value": "<image> q"}]},
                  {"id": "11", "image": "red.png", "conversations": [{"from": "human", "value": "no image"},
                                                                     {"from": "gpt", "value": "a"}]}]
    path = _llava(tmp_path, bad)
    spec = {"name": str(path), "split": "train"}
    with pytest.raises(InputError, match=r"d\.json: record 8 \(id 8\): image file 'missing\.png' not found"):
        build_train_data(load_config({"data": {"train": [spec]}})["data"]["train"])
    cfg = tiny_cfg(tmp_path / "out", train={"max_steps": 1})
    cfg["data"]["train"] = load_config({"data": {"train": [{**spec, "skip_malformed": True}]}})["data"]["train"]
    _, res = run(cfg, tmp_path / "out")
    assert res.skipped_records == 4 and res.steps == 1
    with pytest.raises(InputError, match=r"the dataset is empty"):
        build_train_data(load_config({"data": {"train": [{"name": str(_llava(tmp_path, "[]"))}]}})["data"]["train"])
    with pytest.raises(InputError, match=r"line 1 column \d+"):
        build_train_data(load_config({"data": {"train": [{"name": str(_llava(tmp_path, "[{"))}]}})["data"]["train"])


@pytest.mark.parametrize("conversations, images, needle", [
    ([], 1, "sample s: 'conversations' is missing or empty"),
    ([{"from": "human", "value": "<image> q"}], 1, "sample s: the last turn is from 'human', so the record has no "
                                                    "answer"),
    ([{"from": "human", "value": "<image> <image> q"}, {"from": "gpt", "value": "a"}], 1,
     "sample s: the human turns hold 2 '<image>' placeholder"),
])
def test_bad_samples_are_named_by_the_collator(conversations, images, needle):
    s = Sample(id="s", images=[Image.new("RGB", (8, 8))] * images, conversations=conversations)
    with pytest.raises(InputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        collate([s])


def test_trainer_config_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write to the output directory .*choose a writable output_dir"):
        run(tiny_cfg(train={"max_steps": 1}), blocker / "out")
    with pytest.raises(ConfigError, match="fewer than train.batch_size 32; lower batch_size"):
        run(tiny_cfg(train={"batch_size": 32}), tmp_path / "a")
    with pytest.raises(ConfigError, match="micro_batch_size 3 does not divide the per-process batch 8"):
        run(tiny_cfg(train={"micro_batch_size": 3}), tmp_path / "b")
    cfg = tiny_cfg()
    with pytest.raises(InputError, match="the training set is empty"):
        Trainer(tiny_model(cfg), [], cfg, output_dir=tmp_path / "c", progress=False, log=None)
    run(tiny_cfg(train={"max_steps": 1}), tmp_path / "e")
    with pytest.raises(ConfigError, match="already holds checkpoints .*step-0000001.*--resume, or train into a new"):
        run(tiny_cfg(train={"max_steps": 1}), tmp_path / "e")
    _, again = run(tiny_cfg(train={"max_steps": 1}), tmp_path / "e", overwrite=True)
    assert again.steps == 1 and len((tmp_path / "e" / "train_log.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ConfigError, match="train.lora has unknown key"):
        run(tiny_cfg(train={"lora": {"rank": 4}}), tmp_path / "d")

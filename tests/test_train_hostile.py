"""The training stack against hostile or broken input: crafted checkpoints must not run code,
a killed run's leftovers (temporary checkpoint files, metrics past the checkpoint) are cleaned
on the next start, and bad config files end in one error line naming the file and the field.

Runs are tiny (16 px images, a few steps) and single-threaded, as in test_train.py.
"""

from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch
from test_train import T2I

from vqim.train.main import main as vqim_cli
from vqim.train import shapes, train
from vqim.train.cli import main as train_cli
from vqim.train.config import TrainConfig
from vqim.train.export import export
from vqim.train.run import CHECKPOINT, METRICS
from vqim.train.stage2 import Stage2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes.make_dataset(root, 8, seed=0, size=32)
    return root


def _cfg(data, out_dir, **kw) -> TrainConfig:
    base = dict(data=str(data), out_dir=str(out_dir), model="tiny-t2i", model_overrides=T2I, steps=2,
                batch_size=4, w_adv=0.0, w_perceptual=0.0, log_every=1, ckpt_every=2, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def stage1_ckpt(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1")
    train(_cfg(data, out), "stage1")
    return out / CHECKPOINT


# ----------------------------------------------------------------------------- crafted checkpoints


class _Payload:
    """Unpickling this calls ``os.mkdir(marker)``: the marker folder shows whether it ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _crafted(path, marker, fmt: str):
    """A file that runs the payload when unpickled: a torch.save zip that otherwise looks like a
    stage-1 checkpoint, or a bare pickle (torch.load's legacy format)."""
    obj = {"stage": "stage1", "step": 1, "model_config": {}, "train_config": {"seed": 0}, "model": {},
           "rng": [_Payload(marker)]}
    if fmt == "zip":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    return path


@pytest.mark.parametrize("fmt", ["zip", "pickle"])
def test_export_of_a_crafted_checkpoint_runs_nothing(tmp_path, capsys, fmt):
    bad = _crafted(tmp_path / "evil.pt", tmp_path / "marker", fmt)
    with pytest.raises(ValueError, match=r"checkpoint: .*evil\.pt"):
        export(bad, tmp_path / "out")
    assert not (tmp_path / "marker").exists()
    assert train_cli(["export", str(bad), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("vqim train: error: checkpoint: ") and "evil.pt" in err[0], err
    assert not (tmp_path / "marker").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["zip", "pickle"])
def test_stage2_tokenizer_checkpoint_crafted_runs_nothing(data, tmp_path, fmt):
    bad = _crafted(tmp_path / "evil.pt", tmp_path / "marker", fmt)
    with pytest.raises(ValueError, match=r"tokenizer_checkpoint: .*evil\.pt"):
        Stage2(_cfg(data, tmp_path / "run", tokenizer_checkpoint=str(bad)))
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("fmt", ["zip", "pickle"])
def test_resume_from_a_crafted_checkpoint_runs_nothing(data, tmp_path, fmt):
    (tmp_path / "run").mkdir()
    _crafted(tmp_path / "run" / CHECKPOINT, tmp_path / "marker", fmt)
    with pytest.raises(ValueError, match=r"--resume: .*checkpoint\.pt"):
        train(_cfg(data, tmp_path / "run"), "stage1", resume=True)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("content", ["garbage", "list", "no_model", "truncated", "empty"])
def test_export_refuses_files_that_are_not_checkpoints(stage1_ckpt, tmp_path, content):
    p = tmp_path / "x.pt"
    if content == "garbage":
        p.write_bytes(b"\x00not a checkpoint at all")
    elif content == "list":
        torch.save([1, 2, 3], p)
    elif content == "no_model":
        torch.save({"stage": "stage1", "step": 3}, p)
    elif content == "truncated":
        p.write_bytes(stage1_ckpt.read_bytes()[: stage1_ckpt.stat().st_size // 2])
    else:
        p.write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint: .*x\.pt"):
        export(p, tmp_path / "out")


def test_checkpoints_hold_only_plain_values_and_still_load(data, stage1_ckpt, tmp_path):
    """Stage-1 (AdamW, discriminator, code counts) and stage-2 (Adafactor8bit int8 moments)
    checkpoints load with weights_only=True, so no allow-list is needed; export and stage 2
    accept them."""
    s1 = tmp_path / "s1"
    train(_cfg(data, s1, w_adv=0.1, code_restart_every=1), "stage1")
    run = train(_cfg(data, tmp_path / "s2", tokenizer_checkpoint=str(s1 / CHECKPOINT)), "stage2")
    for p in (stage1_ckpt, s1 / CHECKPOINT, tmp_path / "s2" / CHECKPOINT):
        assert isinstance(torch.load(p, map_location="cpu", weights_only=True), dict)
    assert export(tmp_path / "s2" / CHECKPOINT, tmp_path / "model") == tmp_path / "model"
    resumed = train(_cfg(data, tmp_path / "s2", steps=3, tokenizer_checkpoint=str(s1 / CHECKPOINT)), "stage2",
                    resume=True)
    assert [h["step"] for h in resumed.history] == [3] and len(run.history) == 2


# ----------------------------------------------------------------------------- a killed run's leftovers


def test_start_and_resume_remove_stale_checkpoint_temp_files_only(data, tmp_path):
    out = tmp_path / "run"
    train(_cfg(data, out, steps=4), "stage1", stop_after=3)  # "killed" after step 3; checkpoint at 2
    size = (out / CHECKPOINT).stat().st_size
    stale = [out / f".{CHECKPOINT}.4242.139872.tmp", out / f".{METRICS}.4242.139872.tmp"]
    keep = [out / "notes.tmp", out / f"{CHECKPOINT}.4242.1.tmp", out / f".{CHECKPOINT}.tmp",
            out / f".{CHECKPOINT}.4242.1.tmp.bak", out / f".other.pt.4242.1.tmp", out / f".{CHECKPOINT}.x.1.tmp"]
    for p in stale + keep:
        p.write_bytes(b"\0" * size)
    train(_cfg(data, out, steps=4), "stage1", resume=True)
    assert [p.name for p in stale if p.exists()] == []
    assert all(p.exists() for p in keep)
    # A fresh start in the same folder cleans up too.
    stale[0].write_bytes(b"\0" * size)
    train(_cfg(data, out, steps=1), "stage1")
    assert not stale[0].exists() and all(p.exists() for p in keep)


def test_resume_drops_metrics_past_the_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    train(_cfg(data, out, steps=6, ckpt_every=3), "stage1", stop_after=5)  # logged 1..5, checkpoint at 3
    before = (out / METRICS).read_text().splitlines()
    assert [json.loads(x)["step"] for x in before] == [1, 2, 3, 4, 5]
    with (out / METRICS).open("a") as f:
        f.write('{"step": 6, "lo')  # a kill in the middle of an append
    train(_cfg(data, out, steps=6, ckpt_every=3), "stage1", resume=True)
    lines = (out / METRICS).read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert lines[:3] == before[:3]  # records up to the checkpoint are kept as they were
    assert "codebook_usage" in recs[-1] and recs[-1]["step"] == 6
    assert not list(out.glob(".*.tmp"))


# ----------------------------------------------------------------------------- bad config files


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("vqim train: error: "), lines
    return lines[0]


@pytest.mark.parametrize("name,text,field", [
    ("list.json", "[1, 2]", "must hold a JSON object"),
    ("nodata.json", '{"out_dir": "o"}', "missing training config key(s) ['data']"),
    ("malformed.json", '{"data": "d", "out_dir": ', "not valid JSON"),
    ("trailing.toml", 'data = "d"\nout_dir = ', "not valid TOML"),
    ("unknown.json", '{"data": "d", "out_dir": "o", "stepz": 3}', "stepz"),
    ("steps_str.json", '{"data": "d", "out_dir": "o", "steps": "10"}', "steps must be an int, got '10'"),
    ("steps_bool.json", '{"data": "d", "out_dir": "o", "steps": true}', "steps must be an int, got True"),
    ("lr_str.json", '{"data": "d", "out_dir": "o", "lr": "fast"}', "lr must be a finite number"),
    ("lr_nan.json", '{"data": "d", "out_dir": "o", "lr": NaN}', "lr must be a finite number, got nan"),
    ("beta_inf.json", '{"data": "d", "out_dir": "o", "beta": Infinity}', "beta must be a finite number, got inf"),
    ("data_int.json", '{"data": 5, "out_dir": "o"}', "data must be a string, got 5"),
    ("progress.json", '{"data": "d", "out_dir": "o", "progress": "yes"}', "progress must be true or false"),
    ("optim.json", '{"data": "d", "out_dir": "o", "optimizer": 3}', "optimizer must be a string or null"),
    ("overrides_list.json", '{"data": "d", "out_dir": "o", "model_overrides": []}', "model_overrides must be an object"),
    ("overrides_section.json", '{"data": "d", "out_dir": "o", "model_overrides": {"vqgan": 3}}',
     "model_overrides.vqgan must be an object"),
    ("overrides_name.json", '{"data": "d", "out_dir": "o", "model_overrides": {"name": [1]}}',
     "model_overrides.name must be a string"),
    ("overrides_unknown.json", '{"data": "d", "out_dir": "o", "model_overrides": {"vqqan": {}}}', "unknown section 'vqqan'"),
])
def test_bad_config_file_is_one_error_line_naming_file_and_field(tmp_path, capsys, monkeypatch, name, text, field):
    monkeypatch.chdir(tmp_path)  # the configs' relative data and out_dir land here, should a check miss
    p = tmp_path / name
    p.write_text(text)
    assert train_cli(["stage1", str(p)]) == 2
    line = _one_error_line(capsys)
    assert str(p) in line and field in line, line


def test_config_file_unreadable_cases(tmp_path, capsys):
    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"data": "caf\xe9", "out_dir": "o"}'.encode("latin-1"))
    (tmp_path / "folder.json").mkdir()
    for p in (bad, tmp_path / "folder.json", tmp_path / "missing.json"):
        assert train_cli(["stage2", str(p)]) == 2
        line = _one_error_line(capsys)
        assert str(p) in line, line
    # Through the top-level CLI too.
    assert vqim_cli(["train", "stage1", str(bad)]) == 2
    assert re.search(r"latin1\.json.*UTF-8", _one_error_line(capsys))


def test_model_path_that_is_not_a_config_is_one_error_line(tmp_path, capsys):
    (tmp_path / "m.json").write_text("[1]")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"data": str(tmp_path), "out_dir": str(tmp_path / "o"), "model": str(tmp_path / "m.json")}))
    assert train_cli(["stage1", str(cfg)]) == 2
    line = _one_error_line(capsys)
    assert "model: " in line and "m.json must hold a JSON object" in line, line


def test_config_overrides_from_the_command_line_are_checked(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"data": str(tmp_path)}))
    assert train_cli(["stage1", str(p)]) == 2
    assert "missing training config key(s) ['out_dir']" in _one_error_line(capsys)
    assert TrainConfig.load(p, out_dir=str(tmp_path / "o")).out_dir == str(tmp_path / "o")

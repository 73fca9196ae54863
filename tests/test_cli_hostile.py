"""The ``vqim`` command line against hostile input: every user error is exit status 2 and one
``vqim: error:`` line (never a traceback), checked before any generation; a model fault
(FloatingPointError) or a failed write is exit status 1 and one line; outputs are written
atomically, so a failed write leaves the previous file whole."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqim.engine import Engine, api
from vqim.engine.entrypoints.cli import main


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _error_line(capsys, argv: list[str], rc: int = 2) -> str:
    """Runs ``vqim argv`` in-process; asserts exit ``rc`` and exactly one ``vqim: error:`` line."""
    got = main(argv)
    err = capsys.readouterr().err
    assert got == rc, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vqim: error: "), err
    return lines[0]


def _exe() -> str:
    beside = Path(sys.executable).parent / "vqim"  # the venv's script, even when not on PATH
    exe = str(beside) if beside.is_file() else shutil.which("vqim")
    assert exe is not None, "the vqim console script is not installed (pip install -e .)"
    return exe


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    Engine.from_preset("tiny-t2i", device="cpu").save_pretrained(d)
    return d


@pytest.fixture
def codes_file(tmp_path) -> Path:
    p = tmp_path / "codes.npy"
    np.save(p, np.random.default_rng(0).integers(0, 256, (1, 8, 8)))
    return p


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the CLI builds a model: checks that must come before any work."""
    def refuse(*a, **k):
        raise AssertionError("the CLI built a model before checking its arguments")

    monkeypatch.setattr(api.Engine, "from_preset", refuse)
    monkeypatch.setattr(api.Engine, "from_pretrained", refuse)


# ----------------------------------------------------------------------------- devices and models


@pytest.mark.parametrize("device", ["cuda", "tpu", "meta", "cuda:x"])
def test_bad_device_exits_2(capsys, tmp_path, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    line = _error_line(capsys, ["generate", "a", "--preset", "tiny-t2i", "--device", device, "-q",
                                "-o", str(tmp_path / "x.png")])
    assert "device" in line
    assert not (tmp_path / "x.png").exists()


def _break(d: Path, how: str) -> None:
    if how == "no config.json":
        (d / "config.json").unlink()
    elif how == "config.json not JSON":
        (d / "config.json").write_text("{ not json")
    elif how == "wrong tensor":
        from safetensors.torch import load_file, save_file

        state = load_file(d / "model.safetensors")
        state["decoder.head.weight"] = torch.zeros(3, 5)
        save_file(state, d / "model.safetensors")


@pytest.mark.parametrize("how, match", [("no config.json", "config.json"), ("config.json not JSON", ""),
                                        ("wrong tensor", "decoder.head.weight")])
def test_broken_model_directory_exits_2(capsys, tmp_path, model_dir, how, match):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    _break(d, how)
    line = _error_line(capsys, ["generate", "a", "--model", str(d), "--device", "cpu", "-q",
                                "-o", str(tmp_path / "x.png")])
    assert match in line


# ----------------------------------------------------------------------------- output paths


def test_output_that_is_a_directory_exits_2_before_any_work(capsys, tmp_path, codes_file, no_model):
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "dir.npy").mkdir()
    img = tmp_path / "img.png"
    Image.new("RGB", (64, 64)).save(img)
    for argv in (["generate", "a", "--preset", "tiny-t2i", "-q", "-o", str(tmp_path / "dir.png")],
                 ["decode", str(codes_file), "--preset", "tiny-t2i", "-o", str(tmp_path / "dir.png")],
                 ["encode", str(img), "--preset", "tiny-t2i", "-o", str(tmp_path / "dir.npy")]):
        assert "is a directory" in _error_line(capsys, argv)
    (tmp_path / "many-1.png").mkdir()
    line = _error_line(capsys, ["generate", "a", "-n", "2", "--preset", "tiny-t2i", "-q",
                                "-o", str(tmp_path / "many.png")])
    assert "many-1.png is a directory" in line
    assert not (tmp_path / "many-0.png").exists()


@pytest.mark.parametrize("command, name, match", [
    ("generate", "out.txt", r"-o/--output must end in an image extension PIL can write \(.png"),
    ("generate", "out", r"-o/--output must end in an image extension"),
    ("generate", "out.xbm", r"-o/--output must end in an image extension"),
    ("decode", "out.txt", r"-o/--output must end in an image extension"),
    ("encode", "codes.txt", r"-o/--output must end in .npy"),
    ("encode", "codes", r"-o/--output must end in .npy"),
])
def test_output_extension_is_checked_before_any_work(capsys, tmp_path, codes_file, no_model, command, name, match):
    img = tmp_path / "img.png"
    Image.new("RGB", (64, 64)).save(img)
    inputs = {"generate": ["a", "-q"], "decode": [str(codes_file)], "encode": [str(img)]}[command]
    line = _error_line(capsys, [command, *inputs, "--preset", "tiny-t2i", "-o", str(tmp_path / name)])
    assert re.search(match, line), line
    assert not (tmp_path / name).exists()


def test_output_under_a_file_exits_2(capsys, tmp_path, no_model):
    (tmp_path / "file").write_text("x")
    line = _error_line(capsys, ["generate", "a", "--preset", "tiny-t2i", "-q", "-o", str(tmp_path / "file" / "o.png")])
    assert "is not a directory" in line


# ----------------------------------------------------------------------------- prompts


def test_non_utf8_prompt_in_process_exits_2(capsys, tmp_path):
    line = _error_line(capsys, ["generate", "-p", "a", "-p", "b\udcff", "--preset", "tiny-t2i", "-q",
                                "-o", str(tmp_path / "x.png")])
    assert "prompts[1] is not valid Unicode" in line


def test_non_utf8_prompt_bytes_on_the_command_line_exit_2(tmp_path):
    out = tmp_path / "x.png"
    r = subprocess.run([_exe().encode(), b"generate", b"\xff", b"--preset", b"tiny-t2i", b"--device", b"cpu",
                        b"-q", b"-o", os.fsencode(out)], capture_output=True, timeout=300, env=_env())
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vqim: error: prompts[0] is not valid Unicode"), err
    assert not out.exists()


# ----------------------------------------------------------------------------- input files


def test_bad_codes_files_exit_2(capsys, tmp_path):
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    none = tmp_path / "none.npy"
    np.save(none, np.zeros((0, 8, 8), np.int64))
    text = tmp_path / "text.npy"
    text.write_text("hello")
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    folder = tmp_path / "folder.npy"
    folder.mkdir()
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    out = tmp_path / "o.png"
    for path, match in ((empty, "empty.npy"), (none, r"none.npy holds no codes \(shape \(0, 8, 8\)\)"),
                        (text, "text.npy"), (pickled, "pickled.npy"), (folder, "folder.npy is a directory"),
                        (fifo, "fifo.npy must be a regular file, got a FIFO"),
                        (tmp_path / "missing.npy", "missing.npy")):
        line = _error_line(capsys, ["decode", str(path), "--preset", "tiny-t2i", "-o", str(out)])
        assert re.search(match, line), line
    assert not out.exists()


def test_uint16_codes_decode(tmp_path, capsys):
    codes = tmp_path / "c16.npy"
    np.save(codes, np.random.default_rng(0).integers(0, 256, (1, 8, 8)).astype(np.uint16))
    out = tmp_path / "o.png"
    assert main(["decode", str(codes), "--preset", "tiny-t2i", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (64, 64)


def test_bad_image_files_exit_2(capsys, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    out = tmp_path / "codes.npy"
    for path, match in ((text, "notes.png"), (truncated, "truncated.png"), (folder, "folder.png is a directory"),
                        (fifo, "fifo.png must be a regular file, got a FIFO"),
                        (tmp_path / "missing.png", "missing.png")):
        line = _error_line(capsys, ["encode", str(good), str(path), "--preset", "tiny-t2i", "-o", str(out)])
        assert re.search(match, line), line
    assert not out.exists()


def test_sixteen_bit_png_encodes_like_its_eight_bit_version(tmp_path, capsys):
    a16 = (np.random.default_rng(0).integers(0, 256, (64, 64)) * 257).astype(np.uint16)
    p16, p8 = tmp_path / "g16.png", tmp_path / "g8.png"
    Image.fromarray(a16).save(p16)
    Image.fromarray((a16 // 257).astype(np.uint8)).save(p8)
    with Image.open(p16) as im:
        assert im.mode.startswith("I")
    assert main(["encode", str(p16), str(p8), "--preset", "tiny-t2i", "-o", str(tmp_path / "c.npy")]) == 0
    c = np.load(tmp_path / "c.npy")
    assert np.array_equal(c[0], c[1])


# ----------------------------------------------------------------------------- model faults, writes


def test_nan_weights_exit_1_with_one_line(capsys, tmp_path, model_dir):
    """A FloatingPointError is a model fault, not a usage error: status 1, still one line."""
    d = tmp_path / "nan"
    shutil.copytree(model_dir, d)
    from safetensors.torch import load_file, save_file

    state = load_file(d / "model.safetensors")
    state["decoder.head.weight"].fill_(float("nan"))
    save_file(state, d / "model.safetensors")
    line = _error_line(capsys, ["generate", "a", "--model", str(d), "--device", "cpu", "-q", "-o",
                                str(tmp_path / "x.png")], rc=1)
    assert "no finite logit" in line
    assert not (tmp_path / "x.png").exists()


def test_a_failed_write_leaves_the_previous_outputs_whole(tmp_path, codes_file):
    """``ulimit -f 0``: every write to a file fails (EFBIG; Python ignores SIGXFSZ). The
    outputs are written to a temporary name and renamed, so the previous files stay whole."""
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(img)
    old_png = img.read_bytes()
    out_png = tmp_path / "out.png"
    out_png.write_bytes(old_png)
    out_npy = tmp_path / "out.npy"
    np.save(out_npy, np.arange(10))
    old_npy = out_npy.read_bytes()
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["generate", "a", "-q", "-o", str(out_png)], ["decode", str(codes_file), "-o", str(out_png)],
                 ["encode", str(img), "-o", str(out_npy)]):
        r = subprocess.run(["bash", "-c", 'ulimit -f 0; exec "$@"', "bash", _exe(), *argv, "--preset", "tiny-t2i",
                            "--device", "cpu"], capture_output=True, text=True, timeout=300, env=_env())
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1, r.stderr
        assert len(lines) == 1 and lines[0].startswith("vqim: error: ") and "Traceback" not in r.stderr, r.stderr
        assert out_png.read_bytes() == old_png and out_npy.read_bytes() == old_npy, argv[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == before, "a temporary file was left behind"


@pytest.mark.parametrize("flags, match", [(["--keep-rows", "99"], r"keep must be a number of top grid rows in \[0, 8\]"),
                                          (["--keep-rows", "2", "--top-p", "2"], "top_p must be in")])
def test_a_refused_edit_prints_its_error_and_nothing_else(capsys, tmp_path, flags, match):
    """No progress bar before the error line: the request is checked before the bar starts."""
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "in.png")
    assert main(["edit", str(tmp_path / "in.png"), "a red circle", *flags, "--preset", "tiny-t2i", "--device", "cpu",
                 "-o", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(match, err) and err.startswith("vqim: error:"), err
    assert not (tmp_path / "out.png").exists()

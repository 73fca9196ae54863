"""The ``vqim`` command line on the tiny random-weight presets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqim.train.main import main


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _valid_png(path, size=(64, 64)) -> np.ndarray:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size and im.mode == "RGB"
        return np.asarray(im)


def test_entry_point_generate_writes_a_png(tmp_path):
    """The installed console script, as the README runs it."""
    beside = Path(sys.executable).parent / "vqim"  # the venv's script, even when not on PATH
    exe = str(beside) if beside.is_file() else shutil.which("vqim")
    assert exe is not None, "the vqim console script is not installed (pip install -e .)"
    out = tmp_path / "out.png"
    r = subprocess.run([exe, "generate", "a red circle", "--preset", "tiny-t2i", "-o", str(out), "--seed", "0",
                        "--device", "cpu"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    _valid_png(out)


def test_generate_several_then_encode_and_decode(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a", "b", "-n", "2", "--preset", "tiny-t2i", "-o", str(out), "--seed", "1", "-q"]) == 0
    paths = [tmp_path / f"img-{i}.png" for i in range(4)]
    arrays = [_valid_png(p) for p in paths]
    codes = tmp_path / "codes.npy"
    assert main(["encode", *map(str, paths), "--preset", "tiny-t2i", "-o", str(codes)]) == 0
    c = np.load(codes)
    assert c.shape == (4, 8, 8) and c.dtype == np.int64 and 0 <= c.min() and c.max() < 256
    assert main(["decode", str(codes), "--preset", "tiny-t2i", "-o", str(tmp_path / "dec.png")]) == 0
    assert _valid_png(tmp_path / "dec-3.png").shape == arrays[3].shape


def test_class_conditional_generate(tmp_path):
    out = tmp_path / "v.png"
    assert main(["generate", "--preset", "tiny-vim", "--class-id", "3", "--cfg", "2", "-o", str(out), "-q"]) == 0
    _valid_png(out)


def test_bad_input_exits_2_with_one_error_line(tmp_path, capsys):
    assert main(["generate", "--preset", "tiny-t2i", "-o", str(tmp_path / "x.png"), "-q"]) == 2
    assert "give a PROMPT" in capsys.readouterr().err
    assert main(["generate", "a", "--preset", "tiny-t2i", "--top-p", "0", "-o", str(tmp_path / "x.png"), "-q"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "a", "--model", str(tmp_path / "none"), "-o", str(tmp_path / "x.png"), "-q"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["generate", "a", "--preset", "vit-vqgan-small", "-o", str(tmp_path / "x.png"), "-q"]) == 2
    assert "tokenizer-only" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_bench_prints_a_table(capsys):
    assert main(["bench", "tiny-vim", "--batch", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    header, row = out.out.strip().splitlines()
    assert header.split()[:5] == ["preset", "dtype", "batch", "rows", "mode"]
    assert row.split()[:5] == ["tiny-vim", "float32", "1", "2", "eager"]
    assert "CPU timings" in out.err

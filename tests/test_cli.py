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
    assert main(["generate", "-p", "a", "-p", "b", "-n", "2", "--preset", "tiny-t2i", "-o", str(out), "--seed", "1",
                 "-q"]) == 0
    paths = [tmp_path / f"img-{i}.png" for i in range(4)]
    arrays = [_valid_png(p) for p in paths]
    codes = tmp_path / "codes.npy"
    assert main(["encode", *map(str, paths), "--preset", "tiny-t2i", "-o", str(codes)]) == 0
    c = np.load(codes)
    assert c.shape == (4, 8, 8) and c.dtype == np.int64 and 0 <= c.min() and c.max() < 256
    assert main(["decode", str(codes), "--preset", "tiny-t2i", "-o", str(tmp_path / "dec.png")]) == 0
    assert _valid_png(tmp_path / "dec-3.png").shape == arrays[3].shape


def test_prompt_forms_words_flags_and_file(tmp_path, capsys):
    """Unquoted words are one prompt; -p/--prompt repeats; --prompts-file has one per line; the
    forms add up in that order. Each image equals the one its prompt draws alone."""
    def codes(argv, name):
        out = tmp_path / f"{name}.png"
        assert main(["generate", *argv, "--preset", "tiny-t2i", "--seed", "4", "-q", "-o", str(out)]) == 0
        printed = capsys.readouterr().out.split()
        return [np.asarray(Image.open(p)) for p in printed]

    one = codes(["a red circle"], "quoted")
    assert len(one) == 1
    words = codes(["a", "red", "circle"], "words")
    assert len(words) == 1 and np.array_equal(words[0], one[0])
    blue = codes(["-p", "a blue square"], "blue")
    flags = codes(["-p", "a red circle", "--prompt", "a blue square"], "flags")
    assert len(flags) == 2 and np.array_equal(flags[0], one[0]) and np.array_equal(flags[1], blue[0])
    f = tmp_path / "prompts.txt"
    f.write_text("a red circle\n\n  a blue square  \n")
    from_file = codes(["--prompts-file", str(f)], "file")
    assert len(from_file) == 2 and np.array_equal(from_file[1], blue[0])
    mixed = codes(["a", "red", "circle", "-p", "a blue square", "--prompts-file", str(f)], "mixed")
    assert len(mixed) == 4 and np.array_equal(mixed[0], one[0]) and np.array_equal(mixed[3], blue[0])
    for content, want in ((b"\n \n", "no prompt in it"), (b"\xff\xfe", "not UTF-8")):
        f.write_bytes(content)
        assert main(["generate", "--prompts-file", str(f), "--preset", "tiny-t2i", "-q",
                     "-o", str(tmp_path / "bad.png")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--prompts-file" in err and want in err, err
    assert main(["generate", "--prompts-file", str(tmp_path / "none.txt"), "--preset", "tiny-t2i", "-q",
                 "-o", str(tmp_path / "bad.png")]) == 2
    assert "none.txt" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_generate_help_says_words_are_one_prompt(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "ONE prompt" in out and "-p/--prompt" in out


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

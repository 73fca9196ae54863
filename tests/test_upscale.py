"""``upscale``: the engine, the CLI and the bundled super-resolution module together (the module
itself and its training: tests/test_superres.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vqim.engine import Engine
from vqim.engine.entrypoints.cli import main as cli_main
from vqim.engine.superres import bicubic

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundled() -> Engine:
    eng = Engine.from_pretrained(device="cpu")
    yield eng
    eng.close()


def test_generate_upscaled_is_the_module_over_the_decoded_images(bundled):
    codes = bundled.generate_codes("a small blue square at the top left", 2, seed=4)
    small = bundled.decode_codes(codes, output_type="pt")  # (2, 3, 64, 64)
    with torch.no_grad():
        want = bundled.model.superres(small)  # (2, 3, 256, 256)
    got = bundled.decode_codes(codes, output_type="pt", upscale=True)
    assert got.shape == (2, 3, 256, 256)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, bicubic(small, 4))  # trained: not plain bicubic
    images = bundled.generate("a small blue square at the top left", 2, seed=4, upscale=True)
    assert [im.size for im in images] == [(256, 256)] * 2
    np.testing.assert_array_equal(np.asarray(images[0]), (want[0].permute(1, 2, 0) * 255).round().byte().numpy())


def test_upscale_is_checked(bundled):
    with pytest.raises(ValueError, match="upscale must be true or false"):
        bundled.generate("a red circle", upscale="yes")
    tiny = Engine.from_preset("tiny-t2i", device="cpu")
    try:
        with pytest.raises(ValueError, match="upscale needs a model with a super-resolution module"):
            tiny.generate("x", upscale=True)
        with pytest.raises(ValueError, match="upscale needs a model with a super-resolution module"):
            tiny.decode_codes(torch.zeros(1, 8, 8, dtype=torch.long), upscale=True)
    finally:
        tiny.close()


def test_cli_upscale(tmp_path, capsys):
    out = tmp_path / "big.png"
    assert cli_main(["generate", "a large red circle in the center", "--seed", "1", "--upscale", "-q",
                     "-o", str(out)]) == 0
    assert Image.open(out).size == (256, 256)
    codes = tmp_path / "codes.npy"
    assert cli_main(["encode", str(_small(tmp_path)), "-o", str(codes)]) == 0
    assert cli_main(["decode", str(codes), "--upscale", "-o", str(tmp_path / "dec.png")]) == 0
    assert Image.open(tmp_path / "dec.png").size == (256, 256)
    capsys.readouterr()
    assert cli_main(["generate", "x", "--preset", "tiny-t2i", "--upscale", "-q", "-o", str(out)]) == 2
    assert "upscale needs a model with a super-resolution module" in capsys.readouterr().err


def _small(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(path)
    return path

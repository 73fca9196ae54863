"""The shapes alignment benchmark, on an engine stand-in whose answers are known, and on a
real random-weight engine (structure only: random weights draw no shapes)."""

import math

import numpy as np
import pytest
import torch

from vqim.train import eval_shapes
from vqim.train import shapes as S


class _Cfg:
    class vqgan:
        image_size = 48
        codebook_size = 16


class OracleEngine:
    """Draws the prompt exactly at cfg_scale > 1 and with the wrong color at cfg_scale 1;
    its 'tokenizer' stores each image in a table and returns it untouched."""

    cfg = _Cfg

    def __init__(self):
        self.table = []

    def generate(self, prompts, num_images, cfg_scale, seed):
        out = []
        for p in prompts:
            specs = S.parse_caption(p)
            if cfg_scale <= 1:
                other = {c: n for c, n in zip(S.COLORS, list(S.COLORS)[1:] + list(S.COLORS)[:1])}
                specs = [S.ShapeSpec(s.shape, other[s.color], s.size, s.position) for s in specs]
            out.append(S.render(specs, 48))
        return out

    def encode_images(self, imgs):
        ids = []
        for im in imgs:
            self.table.append(im)
            ids.append(len(self.table) - 1)
        return torch.tensor(ids)[:, None, None] % 16 + torch.zeros(1, 2, 2, dtype=torch.long)

    def decode_codes(self, codes, output_type):
        n = codes.shape[0]
        imgs = self.table[-n:]
        arrs = [torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 255 for im in imgs]
        return torch.stack(arrs)  # (B, 3, 48, 48)


def test_oracle_scores():
    res = eval_shapes.evaluate(OracleEngine(), num_prompts=10, cfg_scales=(1.0, 3.0), batch_size=4, recon_images=20)
    no_guid, guided = res["alignment"]
    assert guided["exact_one_shape"] == 1.0 and guided["exact_two_shapes"] == 1.0
    assert no_guid["exact_one_shape"] == 0.0 and no_guid["color_accuracy"] == 0.0
    assert no_guid["shape_accuracy"] == 1.0 and no_guid["position_accuracy"] == 1.0
    assert guided["prompts_one_shape"] == 10 and guided["prompts_two_shapes"] == 10
    assert math.isinf(res["tokenizer"]["recon_psnr_db"])  # exact reconstruction
    assert res["tokenizer"]["codes_used"] == 16
    report = eval_shapes.format_report(res)
    assert "exact_one_shape" in report and "PSNR" in report


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_prompts"):
        eval_shapes.evaluate(OracleEngine(), num_prompts=0)
    with pytest.raises(ValueError, match="cfg_scales"):
        eval_shapes.evaluate(OracleEngine(), cfg_scales=())
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="recon_images"):
            eval_shapes.evaluate(OracleEngine(), num_prompts=2, recon_images=bad)


def test_no_reconstruction_images_skips_the_tokenizer_measurement():
    """recon_images=0 (``--recon-images 0``) measures alignment only; it divided by zero once."""
    res = eval_shapes.evaluate(OracleEngine(), num_prompts=3, cfg_scales=(3.0,), batch_size=4, recon_images=0)
    assert res["tokenizer"] is None and res["alignment"][0]["exact_one_shape"] == 1.0
    report = eval_shapes.format_report(res)
    assert "exact_one_shape" in report and "PSNR" not in report


def test_runs_on_a_real_engine():
    from vqim.engine import Engine

    eng = Engine.from_preset("tiny-t2i", device="cpu")
    res = eval_shapes.evaluate(eng, num_prompts=2, cfg_scales=(1.0, 3.0), batch_size=4, recon_images=4)
    for row in res["alignment"]:
        assert 0.0 <= row["exact_one_shape"] <= 1.0 and row["prompts_two_shapes"] == 2
    t = res["tokenizer"]
    assert 0 < t["codebook_usage"] <= 1 and t["recon_psnr_db"] > 0


def test_prompt_grid_pastes_each_image_over_its_prompt():
    from PIL import Image

    prompts = ["a large red circle in the center", "a small blue square on the left", "a large green triangle at the top"]
    grid = eval_shapes.prompt_grid(OracleEngine(), prompts, cfg_scale=3.0, cols=2, scale=2)
    side = 96
    assert grid.size[0] == 2 * (side + 8) + 8
    for i, p in enumerate(prompts):
        x, y = 8 + (i % 2) * (side + 8), 8 + (i // 2) * (grid.size[1] - 8) // 2
        want = S.render(S.parse_caption(p), 48).resize((side, side), Image.NEAREST)
        assert np.array_equal(np.asarray(grid.crop((x, y, x + side, y + side))), np.asarray(want)), p
    with pytest.raises(ValueError, match="prompts"):
        eval_shapes.prompt_grid(OracleEngine(), [])


def test_prompt_grid_of_reranked_images():
    """``candidates=N``: the grid shows what ``generate(..., candidates=N)`` returns."""
    asked = []

    class Reranking(OracleEngine):
        def generate(self, prompts, num_images, cfg_scale, seed, candidates=1):
            asked.append(candidates)
            return super().generate(prompts, num_images, cfg_scale, seed)

    prompts = ["a large red circle in the center"]
    plain = eval_shapes.prompt_grid(Reranking(), prompts, cfg_scale=3.0, cols=1, scale=1)
    best = eval_shapes.prompt_grid(Reranking(), prompts, cfg_scale=3.0, cols=1, scale=1, candidates=8)
    assert asked == [1, 8] and best.size == plain.size


def test_cli_eval_shapes_writes_json(tmp_path, capsys):
    import json

    from vqim.train.main import main

    out = tmp_path / "res.json"
    rc = main(["eval", "shapes", "--preset", "tiny-t2i", "--device", "cpu", "-n", "1", "--cfg", "1", "2",
               "--batch", "2", "--recon-images", "2", "--json", str(out), "--grid", str(tmp_path / "grid.png"),
               "--grid-prompts", "a red circle", "a small blue square on the left"])
    assert rc == 0
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size[0] == 4 * (192 + 8) + 8
    res = json.loads(out.read_text())
    assert [row["cfg_scale"] for row in res["alignment"]] == [1.0, 2.0]
    assert "exact_one_shape" in capsys.readouterr().out


def test_cli_hands_train_to_the_training_cli(capsys):
    from vqim.train.main import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "-h"])
    assert exc.value.code == 0
    assert "stage1" in capsys.readouterr().out

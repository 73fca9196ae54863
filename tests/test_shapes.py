"""The shapes dataset generator, caption grammar and analyzer."""

import json
import random

import pytest

from vqim.train import shapes as S


@pytest.mark.parametrize("split", S.SPLITS)
def test_analyzer_reads_ground_truth(split):
    rng = random.Random(f"test/{split}")
    results = []
    for _ in range(300):
        scene = S.sample_scene(rng, split=split)
        results.append(S.score(S.caption(scene), S.render(scene, 64, rng)))
    exact = sum(r["exact"] for r in results) / len(results)
    assert exact >= 0.99, f"analyzer scored only {exact:.1%} of {split} ground truth"
    assert any(r["num_specs"] == 2 for r in results) and any(r["num_specs"] == 1 for r in results)


def test_analyzer_at_other_resolution():
    rng = random.Random(3)
    scenes = [S.sample_scene(rng) for _ in range(50)]
    assert all(S.score(S.caption(sc), S.render(sc, 128, rng))["exact"] for sc in scenes)


def test_score_catches_each_wrong_attribute():
    want = S.ShapeSpec("circle", "red", "large", (0, 0))
    for wrong in (
        S.ShapeSpec("square", "red", "large", (0, 0)),
        S.ShapeSpec("circle", "blue", "large", (0, 0)),
        S.ShapeSpec("circle", "red", "small", (0, 0)),
        S.ShapeSpec("circle", "red", "large", (2, 2)),
    ):
        r = S.score([want], S.render([wrong]))
        assert not r["exact"]
        bad = [a for a in S.ATTRIBUTES if r[a] == 0]
        assert len(bad) == 1, (wrong, r)
    r = S.score([want], S.render([want, S.ShapeSpec("square", "green", "small", (1, 1))]))
    assert not r["exact"] and not r["count"]


def test_prompt_without_size_or_position_accepts_any():
    img = S.render([S.ShapeSpec("circle", "red", "small", (2, 1))])
    assert S.score("a red circle", img)["exact"]
    assert S.score("a small red circle", img)["exact"]
    assert not S.score("a large red circle", img)["exact"]


def test_caption_parse_round_trip_and_grammar():
    rng = random.Random(0)
    for _ in range(200):
        scene = S.sample_scene(rng)
        assert S.parse_caption(S.caption(scene)) == scene
    assert S.parse_caption("a small blue square on the right and a yellow triangle at the bottom") == [
        S.ShapeSpec("square", "blue", "small", (1, 2)),
        S.ShapeSpec("triangle", "yellow", None, (2, 1)),
    ]
    for bad in ("a pink circle", "a red hexagon", "", "a red circle and a blue square and a green circle"):
        with pytest.raises(ValueError, match="prompt"):
            S.parse_caption(bad)


def test_splits_hold_out_descriptions():
    assert len(S.HELD_OUT) == round(0.1 * 324)
    rng = random.Random(1)
    for _ in range(300):
        assert not any(spec in S.HELD_OUT for spec in S.sample_scene(rng, split="train"))
        assert not any(spec in S.HELD_OUT for spec in S.sample_scene(rng, split="validation"))
        assert any(spec in S.HELD_OUT for spec in S.sample_scene(rng, split="held_out"))
    prompts = S.held_out_prompts(20, num_shapes=1)
    assert len(prompts) == 20 and all(S.parse_caption(p)[0] in S.HELD_OUT for p in prompts)
    val = S.held_out_prompts(20, num_shapes=2, split="validation")
    assert len(val) == 20 and not any(spec in S.HELD_OUT for p in val for spec in S.parse_caption(p))
    with pytest.raises(ValueError, match="split"):
        S.held_out_prompts(2, split="test")


def test_make_dataset_is_deterministic(tmp_path):
    a = S.make_dataset(tmp_path / "a", 12, seed=5)
    b = S.make_dataset(tmp_path / "b", 12, seed=5)
    c = S.make_dataset(tmp_path / "c", 12, seed=5, split="validation")
    la = (a / "captions.jsonl").read_text().splitlines()
    assert la == (b / "captions.jsonl").read_text().splitlines()
    assert la != (c / "captions.jsonl").read_text().splitlines()
    first = json.loads(la[0])
    assert (a / first["file"]).read_bytes() == (b / first["file"]).read_bytes()
    assert len(la) == 12 and not list(a.glob(".captions.*"))
    img = S.Image.open(a / first["file"])
    assert img.size == (64, 64) and img.mode == "RGB"
    assert S.score(first["caption"], img)["exact"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must be >= 1"):
        S.make_dataset(tmp_path, 0, seed=0)
    with pytest.raises(ValueError, match="split must be one of"):
        S.sample_scene(random.Random(0), split="test")
    with pytest.raises(ValueError, match="num_shapes must be 1 or 2"):
        S.sample_scene(random.Random(0), num_shapes=3)

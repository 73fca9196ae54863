"""``vqim batch`` without Ray (engine/entrypoints/batch.py): the bundled model over a JSONL file of
rows, in this process and as two data-parallel ranks under torchrun (gloo is not even needed:
the ranks share nothing but OUTDIR).

Every image equals what ``vqim generate`` draws for its row (one call per row, alone); a shard
folder appears whole; a re-run skips the shards written, redraws a missing one with the same
bytes and clears what a killed try left; a re-run with other prompts or flags is refused; bad
rows are one error line naming the file, line and key, before anything is written. ``vqim batch
--ray`` on a Ray cluster is tests/test_ray.py's; without the ray extra both Ray commands say
which extra to install.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys

import pytest
from vqim.engine import Engine
from vqim.engine.entrypoints.cli import main
from vqim.train.eval_shapes import GRID_PROMPTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = 14
SHARD = 4  # shards of 4, 4, 4 and 2 rows


def _rows() -> list[dict]:
    rows = []
    for i in range(ROWS):
        row = {"prompt": GRID_PROMPTS[i % len(GRID_PROMPTS)]}
        if i % 5:
            row["seed"] = 40 + 3 * i
        if i % 3 == 1:
            row.update(cfg_scale=2.5, temperature=0.7, top_p=0.9)
        if i == 4:
            row["negative_prompt"] = "a large blue square"
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def reference():
    """The PNG bytes ``vqim generate`` writes for each row (``--seed 9`` for rows without one)."""
    eng = Engine.from_pretrained(device="cpu")
    out = []
    for i, row in enumerate(_rows()):
        settings = {k: v for k, v in row.items() if k not in ("prompt", "seed", "negative_prompt")}
        image = eng.generate([row["prompt"]], seed=row.get("seed", 9 + i), negative_prompt=row.get("negative_prompt"),
                             **settings)[0]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    eng.close()
    return out


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n\n")  # a blank line is skipped
    return path


def _batch(prompts, out, *flags: str) -> int:
    return main(["batch", str(prompts), str(out), "--shard-size", str(SHARD), "--seed", "9", "--device", "cpu", "-q",
                 *flags])


def _images(out) -> dict[int, bytes]:
    return {int(p.stem): p.read_bytes() for p in sorted(out.glob("shard-*/*.png"))}


def test_batch_draws_every_row_as_vqim_generate_does(prompts, tmp_path, reference):
    out = tmp_path / "out"
    assert _batch(prompts, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["batch.json", *(f"shard-{k:06d}" for k in range(4))]
    got = _images(out)
    assert list(got) == list(range(ROWS))
    for i, png in got.items():
        assert png == reference[i], f"row {i}"
    rows = _rows()
    meta = [json.loads(line) for k in range(4) for line in (out / f"shard-{k:06d}" / "metadata.jsonl").open()]
    assert [m["index"] for m in meta] == list(range(ROWS))
    for m in meta:
        row = rows[m["index"]]
        assert m["file"] == f"{m['index']:08d}.png"
        assert m["prompt"] == row["prompt"] and m["seed"] == row.get("seed", 9 + m["index"])
        assert m.get("negative_prompt") == row.get("negative_prompt")
        # The settings drawn with: the row's, else the model's generation.json (cfg 1.5, temperature 0.5).
        assert m["settings"]["cfg_scale"] == row.get("cfg_scale", 1.5)
        assert m["settings"]["temperature"] == row.get("temperature", 0.5)
        assert m["settings"]["top_p"] == row.get("top_p", 1.0)


def test_rerun_resumes_and_refuses_another_batch(prompts, tmp_path, reference, capsys):
    out = tmp_path / "out"
    assert _batch(prompts, out) == 0
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*/*")}
    # Shard 2 lost, and what a killed try of it left behind.
    for p in (out / "shard-000002").iterdir():
        p.unlink()
    (out / "shard-000002").rmdir()
    stale = out / ".shard-000002.tmp-999999-0a1b2c3d"
    stale.mkdir()
    (stale / "00000008.png").write_bytes(b"half")
    capsys.readouterr()
    assert main(["batch", str(prompts), str(out), "--shard-size", str(SHARD), "--seed", "9", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "3 already written, 1 to draw" in err and "wrote 1 shards" in err
    assert not stale.exists()
    for p, ident in before.items():
        assert p.exists()
        if p.parent.name != "shard-000002":
            assert (p.stat().st_ino, p.stat().st_mtime_ns) == ident, f"{p} was rewritten"
    assert _images(out) == dict(enumerate(reference))
    # Nothing left to draw: no model is even loaded.
    assert _batch(prompts, out) == 0
    # Another shard size, seed or setting would mix two batches in one folder.
    for flags, key in ((["--shard-size", "5"], "shard_size"), (["--temperature", "0.9"], "sampling")):
        args = ["batch", str(prompts), str(out), "--seed", "9", "--device", "cpu", "-q", *flags]
        if "--shard-size" not in flags:
            args += ["--shard-size", str(SHARD)]
        assert main(args) == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith("vqim: error: OUTDIR") and key in line and "\n" not in line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ranks_draw_alternate_shards(prompts, tmp_path, reference):
    """Plain data parallelism: rank r of 2 draws shards r, r + 2, ..., each with its own whole
    engine (tp = 1 although torchrun's WORLD_SIZE is 2)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "vqim.engine.entrypoints.cli", "batch", str(prompts), str(out),
           "--shard-size", str(SHARD), "--seed", "9", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for k in range(4):
        assert f"rank {k % 2}: {out / f'shard-{k:06d}'}: " in r.stdout, r.stdout
    assert _images(out) == dict(enumerate(reference))


BAD_ROWS = [
    ('{"prompt": "a red circle", "sed": 1}', "line 1: unknown key 'sed'"),
    ("not json", "line 1: not JSON"),
    ('["a red circle"]', "line 1: a row must be a JSON object"),
    ('{"prompt": "a red circle", "seed": -1}', "line 1: seed must be an int in [0, 2**63 - 1], got -1"),
    ('{"prompt": "a red circle", "seed": "3"}', "line 1: seed must be an int"),
    ('{"prompt": 3}', "line 1: prompt must be a string, got 3"),
    ('{"seed": 3}', 'line 1: shapes-demo is a text-to-image model: a row needs a "prompt"'),
    ('{"prompt": "a red circle", "class_id": 3}', 'a row needs a "prompt" (and no "class_id")'),
    ('{"prompt": "a red circle", "top_p": 2}', "line 1: top_p"),
    ('{"prompt": "a red circle"}\n{"prompt": "a blue square", "temperature": -1}', "line 2: temperature"),
    ("\n\n", "no rows in it"),
]


@pytest.mark.parametrize("text, error", BAD_ROWS)
def test_bad_rows_are_one_line_before_anything_is_written(tmp_path, capsys, text, error):
    path = tmp_path / "rows.jsonl"
    path.write_text(text + "\n")
    assert main(["batch", str(path), str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vqim: error: ") and "\n" not in err
    assert error in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, error", [
    (["--shard-size", "0"], "--shard-size must be >= 1, got 0"),
    (["--seed", "-2"], "--seed must be in [0, 2**63 - 1], got -2"),
    (["--ray", "--actors", "0"], "--actors must be >= 1, got 0"),
    (["--ray-address", "127.0.0.1:1"], "--ray-address needs --ray"),
    (["--top-k", "-1"], "top_k"),
])
def test_bad_flags(prompts, tmp_path, capsys, flags, error):
    assert main(["batch", str(prompts), str(tmp_path / "out"), *flags]) == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_outdir_that_is_a_file(prompts, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    assert main(["batch", str(prompts), str(tmp_path / "out")]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("command, extra", [
    (["batch", "ROWS", "OUT", "--ray"], "vqim batch --ray needs the ray extra: pip install 'vqim[ray]'"),
    (["serve", "--ray", "--port", "0"], "vqim serve --ray needs the ray extra: pip install 'vqim[ray]'"),
])
def test_without_the_ray_extra(prompts, tmp_path, command, extra):
    """Where ray cannot be imported, both Ray commands say which extra to install, in one line."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'ray':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Block())\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    args = [str(prompts) if a == "ROWS" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    r = subprocess.run([sys.executable, "-m", "vqim.train.main", *args, "--device", "cpu"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"vqim: error: {extra}"]

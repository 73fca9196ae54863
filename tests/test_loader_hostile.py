"""Hostile, corrupt and stale model directories.

Every bad file fails fast with a ValueError (FileNotFoundError when a required file is absent)
that names the file and what is wrong; config fields are type-checked and bounded; the config,
not the files lying around, decides what loads; saving over a directory leaves no file of the
old model behind; ``atomic_write`` is durable (fsync) as well as atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from vqim.engine import Engine
from vqim.engine import config as C
from vqim.engine.config import ModelConfig
from vqim.engine.text import ByteTokenizer, SentencePieceTokenizer
from vqim.engine.weights import atomic_write, build_model, expected_tensors, load_model, save_pretrained

# A hang check, not a timing assertion: every failure here takes milliseconds when it works.
DEADLINE_S = 5


class _Hang(BaseException):
    """Raised by the deadline; a BaseException so that no ``except OSError`` in the code under
    test can turn a hang into the ValueError the test waits for."""


@contextlib.contextmanager
def _deadline(seconds: float = DEADLINE_S):
    def fire(signum, frame):
        raise _Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.monotonic() - start < seconds


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A valid tiny-t2i model directory (byte-level tokenizer)."""
    out = tmp_path / "model"
    save_pretrained(build_model(ModelConfig.from_name("tiny-t2i"), "cpu"), out)
    return out


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("sp")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"a red circle on a blue square number {i}" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "sp"), vocab_size=40,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return root / "sp.model"


def _edit_config(model_dir: Path, edit) -> None:
    path = model_dir / "config.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _set(section: str | None, key: str, value):
    def edit(d):
        (d if section is None else d[section])[key] = value
    return edit


def _load(model_dir: Path) -> Engine:
    return Engine.from_pretrained(model_dir, device="cpu")


# ----------------------------------------------------------------------------- 1. denial of service


@pytest.mark.parametrize("section,layers", [("vqgan", 10**12), ("decoder", 10**12), ("text", 10**9)])
def test_absurd_layer_counts_fail_at_once_naming_the_field(model_dir, section, layers):
    _edit_config(model_dir, _set(section, "layers", layers))
    with _deadline(), pytest.raises(ValueError, match=rf"config\.json.*Config\.layers must be an int in \[1, 1024\]"):
        _load(model_dir)


def test_layer_counts_within_bounds_are_checked_against_the_weights_before_building(model_dir):
    """1024 layers per stack pass the bounds, but the weights hold 2: the headers say so in
    milliseconds (building the 4096-block meta model first takes tens of seconds)."""
    def edit(d):
        for section in ("vqgan", "decoder", "text"):
            d[section]["layers"] = C.MAX_LAYERS

    _edit_config(model_dir, edit)
    with _deadline(), pytest.raises(ValueError, match=r"model\.safetensors.*(unexpected|missing)"):
        _load(model_dir)


@pytest.mark.parametrize("section,key,value", [
    ("vqgan", "image_size", C.MAX_IMAGE_SIZE * 2), ("vqgan", "patch_size", C.MAX_IMAGE_SIZE * 2),
    ("vqgan", "width", C.MAX_WIDTH * 2), ("vqgan", "heads", C.MAX_HEADS * 2),
    ("vqgan", "mlp_dim", C.MAX_MLP_DIM + 1), ("vqgan", "codebook_size", C.MAX_VOCAB + 1),
    ("vqgan", "code_dim", C.MAX_WIDTH + 1),
    ("text", "vocab_size", C.MAX_VOCAB + 1), ("text", "max_len", C.MAX_TEXT_LEN + 1),
    ("text", "width", C.MAX_WIDTH * 2), ("text", "mlp_dim", 0),
    ("decoder", "vocab_size", C.MAX_VOCAB + 1), ("decoder", "grid_h", C.MAX_GRID + 1),
    ("decoder", "grid_w", 0), ("decoder", "num_classes", C.MAX_VOCAB + 1), ("decoder", "num_classes", -1),
    ("decoder", "memory_dim", C.MAX_WIDTH + 1), ("decoder", "heads", C.MAX_HEADS * 2),
])
def test_size_fields_are_bounded(section, key, value):
    d = ModelConfig.from_name("tiny-t2i").to_dict()
    d[section][key] = value
    cls = {"vqgan": "VQGANConfig", "text": "TextEncoderConfig", "decoder": "DecoderConfig"}[section]
    with pytest.raises(ValueError, match=rf"{cls}\.{key} must be an int in \[-?\d+, \d+\], got {value}"):
        ModelConfig.from_dict(d)


def test_the_bounds_admit_their_limits_and_every_preset():
    assert C.DecoderConfig(layers=C.MAX_LAYERS, conv_kernel=(C.MAX_KERNEL, 1)).layers == C.MAX_LAYERS
    with pytest.raises(ValueError, match=r"DecoderConfig\.layers must be an int in \[1, 1024\]"):
        C.DecoderConfig(layers=C.MAX_LAYERS + 1)
    for name in C.PRESETS:
        cfg = ModelConfig.from_name(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("name", ["tiny-t2i", "tiny-vim", "vit-vqgan-small", "vim-base", "parti-350m"])
def test_expected_tensors_match_the_full_model(name):
    """The loader's tensor list (one layer built, repeated) is exactly the model's state dict."""
    cfg = ModelConfig.from_name(name)
    full = {k: (tuple(v.shape), v.dtype) for k, v in build_model(cfg, "meta").state_dict().items()}
    assert expected_tensors(cfg) == full


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _directory(p: Path) -> None:
    p.mkdir()


def _dev_zero(p: Path) -> None:
    p.symlink_to("/dev/zero")


@pytest.mark.parametrize("make", [_fifo, _directory, _dev_zero], ids=["fifo", "directory", "dev-zero"])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "generation.json", "tokenizer.model"])
def test_special_files_are_refused_naming_the_file(model_dir, make, name):
    if name == "tokenizer.model":
        _edit_config(model_dir, _set("text", "tokenizer", "sentencepiece"))  # so that it is read
    target = model_dir / name
    if target.exists():
        target.unlink()
    make(target)
    with _deadline(), pytest.raises(ValueError, match=rf"{name}.*must be a regular file"):
        _load(model_dir)


# ----------------------------------------------------------------------------- 2. corrupt files


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict | bytes, data: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


def _tensor(header: dict, i: int = 0) -> str:
    return sorted(k for k in header if k != "__metadata__")[i]


def _set_entry(key: str, value):
    def mutate(raw):
        h, data = _split(raw)
        h[_tensor(h)][key] = value
        return _join(h, data)
    return mutate


def _lying_shape(raw):
    h, data = _split(raw)
    entry = h[_tensor(h)]
    entry["shape"] = [2 * entry["shape"][0]] + entry["shape"][1:]
    return _join(h, data)


def _past_the_end(raw):
    h, data = _split(raw)
    last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
    h[last]["data_offsets"][1] += 4
    return _join(h, data)


def _overlapping(raw):
    """A tensor claims the region of an earlier one of the same byte size."""
    h, data = _split(raw)
    names = [k for k in h if k != "__metadata__"]
    begin = {k: h[k]["data_offsets"][0] for k in names}
    size = {k: h[k]["data_offsets"][1] - begin[k] for k in names}
    a, b = next((a, b) for a in names for b in names if begin[a] < begin[b] and size[a] == size[b] > 0)
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    return _join(h, data)


CORRUPT = {
    "empty": (lambda raw: b"", "truncated"),
    "short": (lambda raw: raw[:5], "truncated"),
    "cut in half": (lambda raw: raw[: len(raw) // 2], "truncated"),
    "header past the end": (lambda raw: (10**6).to_bytes(8, "little") + raw[8:100], "truncated"),
    "huge header": (lambda raw: (2**62).to_bytes(8, "little") + raw[8:], "limit"),
    "header not JSON": (lambda raw: _join(b"{not json", _split(raw)[1]), "not valid JSON"),
    "header not UTF-8": (lambda raw: _join(b'{"\xff": 1}', _split(raw)[1]), "UTF-8"),
    "header a list": (lambda raw: _join(b"[1, 2]", _split(raw)[1]), "JSON object"),
    "entry not an object": (lambda raw: _join({**_split(raw)[0], "x": 5}, _split(raw)[1]), "'x'"),
    "unknown dtype": (_set_entry("dtype", "Q7"), "dtype 'Q7'"),
    "float shape": (_set_entry("shape", [1.5]), "shape"),
    "negative offset": (_set_entry("data_offsets", [-4, 0]), "data_offsets"),
    "offsets past the data": (_past_the_end, "data_offsets"),
    "shape lies": (_lying_shape, "shape"),
    "overlap": (_overlapping, "overlap"),
    "trailing bytes": (lambda raw: raw + b"\0" * 16, "cover"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_safetensors_names_the_file_and_the_fault(model_dir, case):
    mutate, what = CORRUPT[case]
    path = model_dir / "model.safetensors"
    path.write_bytes(mutate(path.read_bytes()))
    with _deadline(), pytest.raises(ValueError, match=rf"model\.safetensors.*{what}") as e:
        load_model(model_dir)
    assert type(e.value) is ValueError  # not the library's error


@pytest.mark.parametrize("raw", [b"", b"garbage"], ids=["empty", "garbage"])
def test_corrupt_tokenizer_model_names_the_file(model_dir, raw):
    _edit_config(model_dir, _set("text", "tokenizer", "sentencepiece"))
    (model_dir / "tokenizer.model").write_bytes(raw)
    with pytest.raises(ValueError, match=r"tokenizer\.model.*not a sentencepiece model"):
        _load(model_dir)


@pytest.mark.parametrize("raw,what", [
    (b"[]", "JSON object"), (b"null", "JSON object"), (b'"a string"', "JSON object"),
    (b"{bad", "not valid JSON"), (b'\xff\xfe{"name": "x"}', "UTF-8"), (b"[" * 100_000, "nested"),
    (b'{"name": "a", "name": "b"}', "duplicate key 'name'"), (b" " * (2 << 20) + b"{}", "limit"),
])
def test_malformed_config_json_names_the_file(model_dir, raw, what):
    (model_dir / "config.json").write_bytes(raw)
    with pytest.raises(ValueError, match=rf"config\.json.*{what}"):
        _load(model_dir)


@pytest.mark.parametrize("raw,what", [(b'{"top_k": 3}\xff', "UTF-8"), (b"[]", "JSON object"), (b"{", "not valid JSON")])
def test_malformed_generation_json_names_the_file(model_dir, raw, what):
    (model_dir / "generation.json").write_bytes(raw)
    with pytest.raises(ValueError, match=rf"generation\.json.*{what}"):
        _load(model_dir)


# ----------------------------------------------------------------------------- 3. no coercion


@pytest.mark.parametrize("section,key,value,field", [
    ("decoder", "conv_kernel", "77", "DecoderConfig.conv_kernel"),
    ("decoder", "conv_kernel", [9.7, 9.2], "DecoderConfig.conv_kernel"),
    ("decoder", "conv_kernel", [True, True], "DecoderConfig.conv_kernel"),
    ("decoder", "conv_kernel", [5, C.MAX_KERNEL + 2], "DecoderConfig.conv_kernel"),
    ("decoder", "conv_layers", "01", "DecoderConfig.conv_layers"),
    ("decoder", "conv_layers", [0.0], "DecoderConfig.conv_layers"),
    ("decoder", "conv_layers", [False], "DecoderConfig.conv_layers"),
    ("decoder", "conv_layers", [0, 0], "DecoderConfig.conv_layers"),
    ("decoder", "num_classes", 2.5, "DecoderConfig.num_classes"),
    ("decoder", "memory_dim", 64.0, "DecoderConfig.memory_dim"),
    ("decoder", "cross_attention", 1, "DecoderConfig.cross_attention"),
    ("decoder", "dropout", "x", "DecoderConfig.dropout"),
    ("decoder", "dropout", 1.0, "DecoderConfig.dropout"),
    ("decoder", "dropout", float("nan"), "DecoderConfig.dropout"),
    ("decoder", "dropout", True, "DecoderConfig.dropout"),
    ("vqgan", "layers", True, "VQGANConfig.layers"),
    ("vqgan", "width", "64", "VQGANConfig.width"),
    ("vqgan", "output", 1, "VQGANConfig.output"),
    ("vqgan", "dropout", None, "VQGANConfig.dropout"),
    ("text", "max_len", 128.0, "TextEncoderConfig.max_len"),
    ("text", "tokenizer", ["bytes"], "TextEncoderConfig.tokenizer"),
    ("text", "dropout", -0.1, "TextEncoderConfig.dropout"),
    (None, "name", 5, "ModelConfig.name"),
    (None, "dtype", ["float32"], "ModelConfig.dtype"),
])
def test_config_values_are_type_checked_not_coerced(section, key, value, field):
    d = ModelConfig.from_name("tiny-t2i").to_dict()
    (d if section is None else d[section])[key] = value
    with pytest.raises(ValueError, match=re.escape(field) + " must be"):
        ModelConfig.from_dict(d)


def test_config_json_names_the_file_and_the_field(model_dir):
    _edit_config(model_dir, _set("decoder", "conv_kernel", "77"))
    with pytest.raises(ValueError, match=r"config\.json: DecoderConfig\.conv_kernel must be a list of two odd ints "
                                         r"in \[1, 2049\], got '77'"):
        _load(model_dir)


@pytest.mark.parametrize("section,key", [(None, "decoderr"), ("decoder", "conv_kernal"), ("vqgan", "grid"),
                                         ("text", "vocab")])
def test_unknown_config_keys_are_named(section, key):
    d = ModelConfig.from_name("tiny-t2i").to_dict()
    (d if section is None else d[section])[key] = 1
    with pytest.raises(ValueError, match=rf"unknown key '{key}'"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("section,value", [("vqgan", None), ("vqgan", [1]), ("decoder", "x"), ("text", 3)])
def test_config_sections_must_be_objects(section, value):
    d = ModelConfig.from_name("tiny-t2i").to_dict()
    d[section] = value
    with pytest.raises(ValueError, match=rf"'{section}'"):
        ModelConfig.from_dict(d)


# ----------------------------------------------------------------------------- 4. presets


@pytest.mark.parametrize("name", ["parti-350m", "parti-750m", "parti-3b", "parti-20b"])
def test_parti_presets_use_a_16000_piece_text_vocabulary(name):
    # Seed §[0123]: "a sentence-piece model of vocabulary size 16,000".
    assert ModelConfig.from_name(name).text.vocab_size == 16000


# ----------------------------------------------------------------------------- 5. stale files


def test_saving_over_a_directory_leaves_none_of_the_old_models_files(tmp_path, sp_model):
    out = tmp_path / "model"
    first = Engine.from_preset("tiny-t2i", seed=1, device="cpu")
    save_pretrained(first.model, out, tokenizer_model=sp_model, generation={"temperature": 0.5})
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.model", "generation.json"}
    second = Engine.from_preset("tiny-t2i", seed=2, device="cpu")
    second.save_pretrained(out)
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    back = _load(out)
    assert isinstance(back.tokenizer.impl, ByteTokenizer) and back.generation == {}
    assert torch.equal(back.generate_codes(["a red circle"], seed=3), second.generate_codes(["a red circle"], seed=3))


def test_the_config_decides_which_text_tokenizer_loads(tmp_path, sp_model):
    out = tmp_path / "model"
    save_pretrained(build_model(ModelConfig.from_name("tiny-t2i"), "cpu"), out, tokenizer_model=sp_model)
    eng = _load(out)
    assert isinstance(eng.tokenizer.impl, SentencePieceTokenizer)
    # A tokenizer.model beside a config that says "bytes" is not used, and not carried on.
    _edit_config(out, _set("text", "tokenizer", "bytes"))
    eng = _load(out)
    assert isinstance(eng.tokenizer.impl, ByteTokenizer)
    again = eng.save_pretrained(tmp_path / "again")
    assert not (again / "tokenizer.model").exists()
    assert json.loads((again / "config.json").read_text())["text"]["tokenizer"] == "bytes"
    # A sentencepiece engine saves the tokenizer it loaded, whatever its old directory holds now.
    _edit_config(out, _set("text", "tokenizer", "sentencepiece"))
    eng = _load(out)
    proto = (out / "tokenizer.model").read_bytes()
    (out / "tokenizer.model").write_bytes(b"replaced after loading")
    again = eng.save_pretrained(tmp_path / "sp-again")
    assert (again / "tokenizer.model").read_bytes() == proto


def test_save_pretrained_refuses_a_tokenizer_the_config_cannot_use(tmp_path, sp_model):
    vim = build_model(ModelConfig.from_name("tiny-vim"), "cpu")
    with pytest.raises(ValueError, match="tokenizer_model.*no text encoder"):
        save_pretrained(vim, tmp_path / "vim", tokenizer_model=sp_model)
    assert not (tmp_path / "vim" / "model.safetensors").exists()
    out = tmp_path / "sp"
    save_pretrained(build_model(ModelConfig.from_name("tiny-t2i"), "cpu"), out, tokenizer_model=sp_model)
    sp_engine_model = _load(out).model
    with pytest.raises(ValueError, match="tokenizer_model.*sentencepiece"):
        save_pretrained(sp_engine_model, tmp_path / "lost")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="fifo.*must be a regular file"):
        save_pretrained(build_model(ModelConfig.from_name("tiny-t2i"), "cpu"), tmp_path / "x",
                        tokenizer_model=tmp_path / "fifo")


# ----------------------------------------------------------------------------- 6. durable writes


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    dst = tmp_path / "f.txt"
    atomic_write(dst, lambda p: p.write_text("new"))  # writes by path: nothing of ours holds the file open
    (_, tmp), (_, src, to), (_, parent) = events
    assert Path(tmp).name.startswith(".f.txt.") and tmp == src and to == str(dst)
    assert parent == str(tmp_path) and dst.read_text() == "new"


def test_atomic_write_keeps_the_old_file_when_fsync_fails(tmp_path, monkeypatch):
    dst = tmp_path / "f.txt"
    atomic_write(dst, lambda p: p.write_text("old"))

    def fail(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write(dst, lambda p: p.write_text("new"))
    assert dst.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]

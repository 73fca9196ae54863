"""Tensor-parallel inference (vqim.engine.tp) with gloo on CPU, 2 processes spawned by the test.

One spawn per module (process start-up and torch import dominate): both ranks load the tiny
decoder-only and encoder-decoder models with ``Engine.from_pretrained(dir, tp=2)`` and run every
scenario through the one decode loop (rank 0 plans, both loops run in lock-step): the same calls
on both ranks, concurrent callers on rank 0 alone, a request that fails on one rank, the bundled
model. The results come back through files and the tests compare them with TP=1 in this process.
Per-step logits are compared teacher-forced (both fed the TP=1 tokens) against a float64 TP=1
run, within a small factor of plain fp32 TP=1's own error. ``vqim serve`` and ``vqim generate``
under ``torchrun`` run as real processes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import assert_equal, assert_within_torch_error
from PIL import Image

from vqim import kernels as K
from vqim.engine import Engine, ModelConfig
from vqim.engine import tp as TP
from vqim.engine.profiling.ranks import run_ranks
from vqim.engine.requests import Rows, condition
from vqim.engine.weights import build_model, save_pretrained

WORLD = 2
CONDS = {"tiny-vim": {"class_ids": [3, 7]}, "tiny-t2i": {"prompts": ["a red circle", "two blue squares"]},
         # The Llama decoders of the public models: grouped-query attention (4 heads over 2 K/V
         # heads, split 2 + 1 per rank), the prompt in the sequence, rows of unequal prefix length.
         "tiny-janus": {"prompts": ["a red circle", "two blue squares on a white table"]},
         "tiny-llamagen": {"class_ids": [3, 7]}}
# Greedy is top_k = 1; the sampled case uses guidance, temperature and nucleus filtering.
RUNS = {
    "greedy": dict(num_images=2, cfg_scale=2.0, top_k=1, seed=0),
    "sampled": dict(num_images=2, cfg_scale=3.0, temperature=1.0, top_k=0, top_p=0.9, seed=1234),
}


def _rows(eng: Engine, name: str) -> Rows:
    """The unguided decoder rows of ``CONDS[name]``, one per request."""
    return condition(eng.model, eng.tokenizer, next(iter(CONDS[name].values())))


def _stepwise_logits(eng: Engine, name: str, tokens: torch.Tensor) -> torch.Tensor:
    """Unguided cached decode fed ``tokens [B, n]``: logits ``[B, n, V]`` from prefill and every step."""
    dec = eng.model.decoder
    cfg = dec.cfg
    prefix, memory, mask, prefix_len = _rows(eng, name)  # (B, P), (B, L, W), (B, L), (B,)
    with torch.no_grad():
        state = dec.new_state(prefix.shape[0], memory, mask)
        out = [dec.prefill(state, prefix, prefix_len)]
        pos = prefix_len.clone()  # (B,): each row's first image position
        for i in range(1, cfg.num_tokens):
            out.append(dec.decode_step(state, tokens[:, i - 1], pos))
            pos += 1
    return torch.stack(out, dim=1)  # (B, n, V)


def _conv_attention64(q, k, v, *, grid, kernel, prefix):
    """conv_attention by its definition, in any dtype (the op takes fp32/fp16/bf16 only)."""
    mask = K.conv_mask_ref(grid, kernel, prefix, seq_len=q.shape[2])  # (S, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _conv_decode_attention64(q, k_cache, v_cache, pos, *, grid, kernel, prefix, validate, ring=False, k_new=None,
                             v_new=None):
    assert not ring, "the float64 stand-in reads the plain cache layout"
    if k_new is not None:
        rows = torch.arange(q.shape[0])
        k_cache[rows, :, pos] = k_new[:, :, 0]  # (B, H, Dh)
        v_cache[rows, :, pos] = v_new[:, :, 0]
    mask = K.conv_mask_ref(grid, kernel, prefix, seq_len=k_cache.shape[2])[pos]  # (B, S_max)
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask[:, None, None, :])


def _rms_norm64(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _add_rms_norm64(x, delta, weight, *, eps):
    s = x + delta
    return s, _rms_norm64(s, weight, eps)


def _rope64(x, cos, sin, *, interleaved):
    """The rotation by its definition in x's dtype (the kernels' references round through fp32)."""
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def _rope_decode_attention64(q, k_cache, v_cache, pos, k_new, v_new, cos, sin, *, interleaved, scale=None,
                             validate=True, backend=None):
    rows = torch.arange(q.shape[0])
    c, s = cos[pos][:, None, None], sin[pos][:, None, None]  # (B, 1, 1, Dh/2)
    k_cache[rows, :, pos] = _rope64(k_new, c, s, interleaved=interleaved)[:, :, 0]  # (B, Hkv, Dh)
    v_cache[rows, :, pos] = v_new[:, :, 0]
    g = q.shape[1] // k_cache.shape[1]
    keys = k_cache.repeat_interleave(g, dim=1)  # (B, H, S, Dh)
    values = v_cache.repeat_interleave(g, dim=1)
    seen = torch.arange(k_cache.shape[2]) <= pos[:, None]  # (B, S)
    return F.scaled_dot_product_attention(_rope64(q, c, s, interleaved=interleaved), keys, values,
                                          attn_mask=seen[:, None, None, :])


def _first_images(codes: torch.Tensor, num_images: int) -> torch.Tensor:
    return codes.view(codes.shape[0], -1)[::num_images]  # (B, n): image 0 of each request


def _worker(rank: int, world: int, dirs: dict[str, str], out: str) -> None:
    res: dict[str, object] = {}
    for name in CONDS:
        eng = Engine.from_pretrained(dirs[name], device="cpu", tp=world)
        res[f"{name}/is_main"] = eng.is_main
        res[f"{name}/local_numel"] = sum(p.numel() for p in eng.model.decoder.parameters())
        res[f"{name}/heads"] = eng.model.decoder.blocks[0].attn.heads
        for run, kw in RUNS.items():
            res[f"{name}/{run}"] = eng.generate_codes(**CONDS[name], **kw)
        tokens = _first_images(res[f"{name}/greedy"], RUNS["greedy"]["num_images"])
        # The loops are idle: the main thread may run the model's collectives.
        res[f"{name}/logits"] = _stepwise_logits(eng, name, tokens)
        res[f"{name}/random_seed"] = eng.generate_codes(**CONDS[name], num_images=1, seed=None)
        # One decode step at its real width, collectives counted by the TP layers.
        b = tokens.shape[0]
        dec = eng.model.decoder
        _, memory, mask, _ = _rows(eng, name)
        with torch.no_grad():
            state = dec.new_state(b, memory, mask)
            with TP.count_collectives() as st:
                dec.decode_step(state, tokens[:, 0], torch.tensor([dec.cfg.prefix]))
        res[f"{name}/collectives"] = (dict(st.counts), dict(st.bytes))
        eng.close()
    # Random weights drawn per rank like Engine.from_preset, then sharded (benchmarks, CLI --preset).
    eng = Engine.from_preset("tiny-vim", seed=5, device="cpu", tp=world)
    res["preset/greedy"] = eng.generate_codes(**CONDS["tiny-vim"], **RUNS["greedy"])
    eng.close()
    try:
        Engine.from_pretrained(dirs["bad-heads"], device="cpu", tp=world)
        res["bad-heads"] = "loaded"
    except ValueError as e:
        res["bad-heads"] = str(e)
    try:
        TP.agree(ValueError("corrupt shard on rank 1") if rank == 1 else None)
        res["agree"] = "no error"
    except Exception as e:  # noqa: BLE001 (the test checks the type and message)
        res["agree"] = f"{type(e).__name__}: {e}"
    eng = Engine.from_pretrained(dirs["tiny-vim"], device="cpu", tp=world)
    # Arguments one rank refuses: rank 0's refusal is every rank's; another rank's is its own
    # (the request that runs is rank 0's). Nothing waits on a collective the other rank skipped.
    for bad in (0, 1):
        try:
            eng.generate_codes(**CONDS["tiny-vim"], top_p=1.5 if rank == bad else 1.0, seed=0)
            res[f"rank{bad}-invalid"] = "no error"
        except Exception as e:  # noqa: BLE001 (the test checks the type and message)
            res[f"rank{bad}-invalid"] = f"{type(e).__name__}: {e}"
    # A request that fails on rank 1 alone (where it is admitted, before any collective) fails
    # on every rank, and the loop goes on.
    if rank == 1:
        sched = eng.scheduler
        real = sched._prepare

        def prepare(img):
            if img.spec.seed == 99:
                raise ValueError("injected on rank 1")
            real(img)

        sched._prepare = prepare
    try:
        eng.generate_codes(class_ids=[7], seed=99)
        res["one-rank-fails"] = "no error"
    except Exception as e:  # noqa: BLE001 (the test checks the type and message)
        res["one-rank-fails"] = f"{type(e).__name__}: {e}"
    res["after-failure"] = eng.generate_codes(**CONDS["tiny-vim"], **RUNS["greedy"])
    # Concurrent callers on rank 0 alone (a server's shape): rank 1's loop follows rank 0's plans.
    if rank == 0:
        got: dict[int, torch.Tensor] = {}
        handles = [eng.submit(class_ids=[c], seed=10 + c, timeout=120) for c in range(4)]
        threads = [threading.Thread(target=lambda c=c: got.__setitem__(
            c, eng.generate_codes(class_ids=[c, c + 1], num_images=2, seed=20 + c, cfg_scale=2.0)))
            for c in range(4)]
        for t in threads:
            t.start()
        cancelled = eng.submit(class_ids=[5], num_images=8, seed=1)
        cancelled.cancel()
        for t in threads:
            t.join()
        res["concurrent"] = {c: got[c] for c in range(4)}
        res["submitted"] = [h.result(timeout=120) for h in handles]
        try:
            cancelled.result(timeout=120)
            res["cancelled"] = "finished"
        except Exception as e:  # noqa: BLE001 (the test checks the type)
            res["cancelled"] = type(e).__name__
        eng.close()  # rank 1's loop stops with it
    else:
        eng.join()
    # The bundled model (its reranker's 0-dim temperature is replicated).
    eng = Engine.from_pretrained(device="cpu", tp=world)
    res["bundled"] = eng.generate_codes(["a large red circle in the center"], seed=3)
    eng.close()
    torch.save(res, f"{out}/rank{rank}.pt")
    dist.barrier()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    dirs, engines = {}, {}
    for name in CONDS:
        eng = Engine.from_preset(name, seed=5, device="cpu", dtype=torch.float32)
        dirs[name] = str(eng.save_pretrained(root / name))
        engines[name] = Engine.from_pretrained(dirs[name], device="cpu")
    bad = ModelConfig.from_name("tiny-vim").to_dict()
    bad["decoder"]["heads"] = 1
    dirs["bad-heads"] = str(save_pretrained(build_model(ModelConfig.from_dict(bad), "cpu", torch.float32),
                                            root / "bad-heads"))
    run_ranks(_worker, WORLD, dirs, str(root))
    ranks = [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]
    return engines, dirs, ranks


@pytest.mark.parametrize("run", sorted(RUNS))
@pytest.mark.parametrize("name", sorted(CONDS))
def test_tp2_tokens_equal_tp1(runs, name, run):
    engines, _, ranks = runs
    ref = engines[name].generate_codes(**CONDS[name], **RUNS[run])
    for r, res in enumerate(ranks):
        assert res[f"{name}/is_main"] == (r == 0)
        assert_equal(res[f"{name}/{run}"], ref, msg=f"{name} {run} rank {r}")


def test_tp2_from_preset_equals_tp1_preset(runs):
    _, _, ranks = runs
    ref = Engine.from_preset("tiny-vim", seed=5, device="cpu").generate_codes(**CONDS["tiny-vim"], **RUNS["greedy"])
    for r, res in enumerate(ranks):
        assert_equal(res["preset/greedy"], ref, msg=f"rank {r}")


@pytest.mark.parametrize("name", sorted(CONDS))
def test_tp2_logits_every_step_within_fp32_error(runs, name, monkeypatch):
    engines, dirs, ranks = runs
    tokens = _first_images(engines[name].generate_codes(**CONDS[name], **RUNS["greedy"]), RUNS["greedy"]["num_images"])
    with monkeypatch.context() as m:
        m.setattr(K, "conv_attention", _conv_attention64)
        m.setattr(K, "conv_decode_attention", _conv_decode_attention64)
        m.setattr(K, "add_layer_norm", K.add_layer_norm_ref)  # the definition, in any dtype
        m.setattr(K, "rms_norm_ref", _rms_norm64)
        m.setattr(K, "add_rms_norm", _add_rms_norm64)
        m.setattr(K, "apply_rope_ref", _rope64)
        m.setattr(K, "rope_decode_attention", _rope_decode_attention64)
        # Engine refuses float64 (the kernels do not take it); the reference model is cast after loading.
        eng64 = Engine.from_pretrained(dirs[name], device="cpu")
        eng64.model.double()
        ref64 = _stepwise_logits(eng64, name, tokens)
    tp1 = _stepwise_logits(engines[name], name, tokens)
    for r, res in enumerate(ranks):
        got = res[f"{name}/logits"]
        assert got.dtype == torch.float32
        for step in range(got.shape[1]):
            assert_within_torch_error(got[:, step], ref64[:, step], tp1[:, step], factor=4.0,
                                      msg=f"{name} rank {r} step {step}")
    # The gathered logits are bit-identical on every rank: that is what keeps the sampled tokens equal.
    assert_equal(ranks[0][f"{name}/logits"], ranks[1][f"{name}/logits"], msg=name)


@pytest.mark.parametrize("name", sorted(CONDS))
def test_each_rank_holds_its_shard(runs, name):
    engines, _, ranks = runs
    full = engines[name].model.decoder
    cfg = full.cfg
    replicated = sum(p.numel() for n, p in full.named_parameters()
                     if f"decoder.{n}" not in TP.param_shard_dims(engines[name].model))
    sharded = sum(p.numel() for p in full.parameters()) - replicated
    for res in ranks:
        assert res[f"{name}/heads"] == cfg.heads // WORLD
        assert res[f"{name}/local_numel"] == replicated + sharded // WORLD


@pytest.mark.parametrize("name", sorted(CONDS))
def test_unseeded_generation_agrees_across_ranks(runs, name):
    _, _, ranks = runs
    assert_equal(ranks[0][f"{name}/random_seed"], ranks[1][f"{name}/random_seed"], msg=name)


@pytest.mark.parametrize("name", sorted(CONDS))
def test_collectives_per_step_match_accounting(runs, name):
    engines, _, ranks = runs
    rows = len(next(iter(CONDS[name].values())))
    want = TP.collectives_per_step(engines[name].cfg, rows, WORLD, torch.float32)
    for res in ranks:
        counts, nbytes = res[f"{name}/collectives"]
        assert counts == {"all_reduce": want["all_reduce"], "all_gather": want["all_gather"]}
        assert nbytes == {"all_reduce": want["all_reduce_bytes"], "all_gather": want["all_gather_bytes"]}


def test_heads_not_dividing_fail_on_every_rank(runs):
    _, _, ranks = runs
    for res in ranks:
        assert "decoder.heads = 1 does not divide" in res["bad-heads"], res["bad-heads"]
        assert "tp = 2" in res["bad-heads"]


def test_failure_on_one_rank_raises_on_all(runs):
    _, _, ranks = runs
    assert ranks[1]["agree"] == "ValueError: corrupt shard on rank 1"
    assert ranks[0]["agree"] == "RuntimeError: tensor-parallel rank 1 failed: ValueError: corrupt shard on rank 1"


def test_arguments_rank0_refuses_raise_on_every_rank(runs):
    _, _, ranks = runs
    for res in ranks:
        assert res["rank0-invalid"].startswith("ValueError: top_p"), res["rank0-invalid"]
    # Another rank's own refusal raises there; the request that runs is rank 0's.
    assert ranks[1]["rank1-invalid"].startswith("ValueError: top_p"), ranks[1]["rank1-invalid"]
    assert ranks[0]["rank1-invalid"] == "no error"


def test_a_request_failing_on_one_rank_fails_on_all_and_the_loop_goes_on(runs):
    engines, _, ranks = runs
    assert ranks[1]["one-rank-fails"] == "ValueError: injected on rank 1"
    assert ranks[0]["one-rank-fails"] == "RuntimeError: tensor-parallel rank 1 failed: ValueError: injected on rank 1"
    ref = engines["tiny-vim"].generate_codes(**CONDS["tiny-vim"], **RUNS["greedy"])
    for r, res in enumerate(ranks):
        assert_equal(res["after-failure"], ref, msg=f"rank {r}")


def test_concurrent_callers_on_rank0_get_the_tp1_tokens(runs):
    engines, _, ranks = runs
    eng = engines["tiny-vim"]
    res = ranks[0]
    for c in range(4):
        want = eng.generate_codes(class_ids=[c, c + 1], num_images=2, seed=20 + c, cfg_scale=2.0)
        assert_equal(res["concurrent"][c], want, msg=f"thread {c}")
        assert_equal(res["submitted"][c], eng.generate_codes(class_ids=[c], seed=10 + c), msg=f"submit {c}")
    assert res["cancelled"] == "RequestCancelled"


def test_the_bundled_model_loads_and_generates_with_tp2(runs):
    _, _, ranks = runs
    want = Engine.from_pretrained(device="cpu").generate_codes(["a large red circle in the center"], seed=3)
    for r, res in enumerate(ranks):
        assert_equal(res["bundled"], want, msg=f"rank {r}")


def test_check_tp_names_the_size():
    cfg = ModelConfig.from_name("tiny-t2i")
    TP.check_tp(cfg, 4)
    with pytest.raises(ValueError, match=r"text.heads = 4 does not divide .* tp = 3"):
        TP.check_tp(cfg, 3)
    d = ModelConfig.from_name("tiny-vim").to_dict()
    d["decoder"].update(width=48, heads=3, mlp_dim=96)  # heads and MLP divide by 3, vocab 256 does not
    with pytest.raises(ValueError, match=r"decoder.vocab_size = 256 does not divide .* tp = 3"):
        TP.check_tp(ModelConfig.from_dict(d), 3)
    with pytest.raises(ValueError, match="tp must be an int >= 1"):
        TP.check_tp(cfg, 0)


def test_transform_keeps_parameter_names_with_local_shapes():
    cfg = ModelConfig.from_name("tiny-t2i")
    full = build_model(cfg, "meta")
    shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    dims = TP.param_shard_dims(full)
    local = TP.tensor_parallel(build_model(cfg, "meta"), 1, 4)
    got = {k: tuple(v.shape) for k, v in local.state_dict().items()}
    assert got.keys() == shapes.keys()
    for k, s in shapes.items():
        want = list(s)
        if k in dims:
            want[dims[k]] //= 4
        assert got[k] == tuple(want), k
    assert "vqgan.enc_blocks.0.attn.wq.weight" not in dims  # the tokenizer stays replicated
    same = build_model(cfg, "meta")
    assert TP.tensor_parallel(same, 0, 1) is same and type(same.decoder.head) is torch.nn.Linear
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        TP.tensor_parallel(build_model(cfg, "meta"), 2, 2)


def test_tp_without_torchrun_says_how_to_run(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        Engine.from_pretrained(tmp_path, device="cpu", tp=2)


def _torchrun_env() -> dict:
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun_cmd(args: list[str]) -> list[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}", "--master-addr=127.0.0.1",
            f"--master-port={port}", "-m", "vqim.engine.entrypoints.cli", *args]


def _torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_cmd(args), cwd=cwd, env=_torchrun_env(), capture_output=True, text=True,
                          timeout=240)


def test_cli_under_torchrun_rank0_writes_tp1_images(runs, tmp_path):
    engines, dirs, _ = runs
    out = tmp_path / "img.png"
    p = _torchrun(["generate", "--model", dirs["tiny-vim"], "--class-id", "3", "-n", "2", "--seed", "7",
                   "--device", "cpu", "-q", "-o", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    written = sorted(x.name for x in tmp_path.iterdir())
    assert written == ["img-0.png", "img-1.png"]
    assert p.stdout.count("img-0.png") == 1  # printed (and written) by rank 0 only
    ref = engines["tiny-vim"].generate(class_ids=[3], num_images=2, seed=7)
    for i, im in enumerate(ref):
        got = np.asarray(Image.open(tmp_path / f"img-{i}.png"))
        assert_equal(torch.tensor(np.array(got)), torch.tensor(np.array(im)), msg=f"image {i}")


def test_cli_under_torchrun_error_ends_every_rank(runs, tmp_path):
    _, dirs, _ = runs
    p = _torchrun(["generate", "--model", dirs["bad-heads"], "--device", "cpu", "-q", "-o", str(tmp_path / "x.png")],
                  tmp_path)
    assert p.returncode != 0
    assert p.stderr.count("vqim: error: tiny-vim: decoder.heads = 1 does not divide") == WORLD, p.stderr[-3000:]
    assert not list(tmp_path.glob("*.png"))


def test_serve_under_torchrun_answers_concurrent_requests_with_the_tp1_bytes(runs, tmp_path):
    """``vqim serve`` under torchrun: rank 0 serves HTTP, rank 1's loop follows; concurrent
    requests get the images a tp=1 engine draws; stopping torchrun stops both ranks."""
    pytest.importorskip("fastapi")
    engines, dirs, _ = runs
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(_torchrun_cmd(["serve", "--model", dirs["tiny-t2i"], "--device", "cpu", "--port",
                                           str(port), "--max-batch-size", "4"]),
                            cwd=tmp_path, env=_torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "vqim serve under torchrun did not answer /health"
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)

        def post(k: int) -> list[np.ndarray]:
            body = json.dumps({"prompt": CONDS["tiny-t2i"]["prompts"][k % 2], "n": 2, "seed": 30 + k}).encode()
            req = urllib.request.Request(url + "/v1/images/generations", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                data = json.loads(r.read())["data"]
            return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in data]

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(post, range(4)))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    eng = engines["tiny-t2i"]
    for k, images in enumerate(got):
        want = eng.generate(CONDS["tiny-t2i"]["prompts"][k % 2], 2, seed=30 + k)
        for i, (g, w) in enumerate(zip(images, want)):
            assert np.array_equal(g, np.asarray(w)), (k, i)


def _cuda_worker(rank: int, world: int, model_dir: str, out: str) -> None:
    eng = Engine.from_pretrained(model_dir, device=f"cuda:{rank}", dtype=torch.float32, tp=world)
    res = {"graph": eng.generate_codes(**CONDS["tiny-t2i"], **RUNS["greedy"]).cpu()}
    res["graphs"] = len(eng.scheduler.runner._graphs)
    eng.close()
    eager = Engine(eng.model, eng.tokenizer, device=eng.device, tp_group=dist.group.WORLD, use_cuda_graph=False)
    res["eager"] = eager.generate_codes(**CONDS["tiny-t2i"], **RUNS["greedy"]).cpu()
    eager.close()
    torch.save(res, f"{out}/cuda{rank}.pt")


@pytest.mark.gpu
def test_tp2_nccl_cuda_graph_decode_equals_tp1(runs, tmp_path):
    """The captured decode step with NCCL collectives inside (needs 2 GPUs)."""
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs for NCCL tensor parallelism, found {torch.cuda.device_count()}")
    _, dirs, _ = runs
    ref = Engine.from_pretrained(dirs["tiny-t2i"], device="cuda:0", dtype=torch.float32, use_cuda_graph=False)
    want = ref.generate_codes(**CONDS["tiny-t2i"], **RUNS["greedy"]).cpu()
    run_ranks(_cuda_worker, WORLD, dirs["tiny-t2i"], str(tmp_path), device_type="cuda")
    for r in range(WORLD):
        res = torch.load(tmp_path / f"cuda{r}.pt")
        assert res["graphs"] > 0
        assert_equal(res["graph"], want, msg=f"graph rank {r}")
        assert_equal(res["eager"], want, msg=f"eager rank {r}")

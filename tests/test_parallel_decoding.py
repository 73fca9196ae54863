"""Parallel decoding (engine/parallel.py) as policies of the one decode loop: the multi-token
forward, the conv receptive field the wavefront relies on, wavefront == raster tokens (alone and
sharing steps with raster and SJD requests), the wavefront's pass count, speculative Jacobi
decoding's distribution (chi-square against raster sampling, alone and batched beside raster
requests), edits and timeouts with both, and the Engine / CLI options."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.helpers import assert_close, raster_reference, sharpen
from vqim import kernels as K
from vqim.engine import Engine
from vqim.engine.config import DecoderConfig
from vqim.engine.entrypoints.cli import main as cli_main
from vqim.engine.config import LlamaDecoderConfig
from vqim.engine.llama import LlamaDecoder
from vqim.engine.models import ARDecoder
from vqim.engine.parallel import wavefront_unsupported
from vqim.engine.requests import Request, Rows
from vqim.engine.runner import ModelRunner
from vqim.engine.scheduler import RequestHandle, Scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_IDS = itertools.count()


def _randomized(dec, seed: int, std: float):
    """``dec`` with large random weights (peaked, context-dependent logits), fused, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dec.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    dec.fuse()
    return dec.eval()


def _decoder(seed: int = 0, std: float = 0.3, **cfg) -> ARDecoder:
    """A class-conditional Parti decoder."""
    base = dict(vocab_size=32, grid_h=5, grid_w=7, width=32, layers=3, heads=2, mlp_dim=64, num_classes=3,
                conv_kernel=(3, 3), conv_layers=None, dropout=0.0)
    return _randomized(ARDecoder(DecoderConfig(**{**base, **cfg})), seed, std)


def _llama_decoder(seed: int = 0, std: float = 0.3, **cfg) -> LlamaDecoder:
    """LlamaGen's decoder shape (2D RoPE, grouped-query attention, every layer causal), class-conditional."""
    base = dict(vocab_size=32, grid_h=5, grid_w=7, width=32, layers=2, heads=2, kv_heads=1, mlp_dim=64, rope="2d",
                num_classes=3)
    return _randomized(LlamaDecoder(LlamaDecoderConfig(**{**base, **cfg})), seed, std)


def _scheduler(dec: ARDecoder, rows: int) -> Scheduler:
    """The engine's decode loop over a bare class-conditional decoder with ``rows`` rows."""
    cfg = dec.cfg
    return Scheduler(lambda: ModelRunner(dec, max_rows=rows, device=torch.device("cpu"), text=None),
                     lambda conds: Rows(torch.tensor(conds)[:, None], None, None, torch.ones(len(conds), dtype=torch.long)),
                     num_tokens=cfg.num_tokens,
                     grid=(cfg.grid_h, cfg.grid_w), max_rows=rows, max_queue=10 ** 6)


def _submit(sched: Scheduler, dec: ARDecoder, classes: list[int], guided: bool, seed: int = 0,
            decoding: str = "raster", window: int = 16, forced=None, **settings) -> RequestHandle:
    """Images of ``classes`` (image i seeded ``seed + i``), guided with the null class or not."""
    n = len(classes)
    settings = {"cfg_scale": 3.0, **settings}
    req = Request(list(classes), [dec.null_prefix] * n if guided else None, [K.SamplingParams(**settings)] * n,
                  [seed + i for i in range(n)], 1, forced, decoding, window)
    handle = RequestHandle(sched, next(_IDS), n, dec.cfg.num_tokens, (dec.cfg.grid_h, dec.cfg.grid_w))
    sched.submit(req, handle, wait=True)
    return handle


def _decode(dec: ARDecoder, classes: list[int], guided: bool, seed: int = 0, decoding: str = "raster",
            **kw) -> tuple[torch.Tensor, object]:
    """Tokens ``[B, n]`` and the request's DecodeStats, the request alone in a fresh loop."""
    sched = _scheduler(dec, 2 * len(classes))
    try:
        h = _submit(sched, dec, classes, guided, seed, decoding, **kw)
        return h.result(timeout=600).view(len(classes), -1), h.stats
    finally:
        sched.close()


def _reference(dec: ARDecoder, classes: list[int], guided: bool, seed: int = 0, **settings) -> torch.Tensor:
    """Raster order by a plain loop (tests/helpers.py), independent of the engine's loop."""
    every = classes + ([dec.null_prefix] * len(classes) if guided else [])
    settings = {"cfg_scale": 3.0, **settings}
    return raster_reference(dec, Rows(torch.tensor(every)[:, None], None, None, torch.ones(len(every), dtype=torch.long)),
                            guided,
                            torch.arange(len(classes)) + seed, **settings)


# ------------------------------------------------------------------------------ the forward


@pytest.mark.parametrize("conv_layers", [None, (0,), ()])
def test_forward_tokens_matches_one_token_steps(conv_layers):
    """Feeding a run of tokens in one forward gives each position the logits the one-token decode
    step gives it, on conv and fully causal layers alike (within fp32 rounding)."""
    dec = _decoder(conv_layers=conv_layers)
    b, n = 3, 17
    prefix = torch.tensor([[0], [1], [2]])
    tokens = torch.randint(0, 32, (b, n))
    pos = torch.arange(n) + dec.cfg.prefix
    step_state = dec.new_state(b)
    dec.prefill(step_state, prefix)
    steps = torch.stack([dec.decode_step(step_state, tokens[:, i], pos[i:i + 1]) for i in range(n)], 1)  # (B, n, V)
    state = dec.new_state(b)
    dec.prefill(state, prefix)
    # Two passes, the second with padding entries that must write nothing.
    first = dec.forward_tokens(state, tokens[:, :9], pos[:9].expand(b, -1), torch.ones(b, 9, dtype=torch.bool))
    tail = torch.cat([tokens[:, 9:], torch.zeros(b, 2, dtype=torch.long)], 1)
    tail_pos = torch.cat([pos[9:], pos[-2:]]).expand(b, -1)
    valid = torch.cat([torch.ones(b, n - 9, dtype=torch.bool), torch.zeros(b, 2, dtype=torch.bool)], 1)
    second = dec.forward_tokens(state, tail, tail_pos, valid)[:, :n - 9]
    got = torch.cat([first, second], 1)
    assert_close(got, steps, atol=2e-5 * steps.abs().max().item())
    for a, c in zip(state.k, step_state.k):
        assert_close(a, c, atol=1e-5)


def test_forward_tokens_refuses_the_ring_cache():
    dec = _decoder()
    state = dec.new_state(1, ring=True)
    one = torch.ones(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="kv_cache='plain'"):
        dec.forward_tokens(state, one, one + dec.cfg.prefix, one.bool())


# ------------------------------------------------------------------------------ the wavefront


@pytest.mark.parametrize("kernel", [(3, 3), (5, 3), (3, 5)])
def test_receptive_field_is_what_the_wavefront_assumes(kernel):
    """Teacher forcing an all-conv decoder: the output at fed token (r, c) does not change when a
    token outside {row r up to c, row r - k up to c + k * (kw // 2)} changes, and does change for
    the farthest token inside (so the bound is tight, not merely safe)."""
    layers = 3
    dec = _decoder(layers=layers, conv_kernel=kernel, grid_h=7, grid_w=9)
    gh, gw = 7, 9
    half = kernel[1] // 2
    prefix = torch.tensor([[1]])
    tokens = torch.randint(0, 32, (1, gh * gw))
    base = dec(prefix, tokens)  # (1, 1 + n, V): position 1 + i is fed token i
    r, c = 5, 2
    out = 1 + r * gw + c
    for rr in range(gh):
        for cc in range(gw):
            i = rr * gw + cc
            inside = (rr == r and cc <= c) or (rr < r and cc <= c + (r - rr) * half)
            changed = tokens.clone()
            changed[0, i] = (changed[0, i] + 1) % 32
            diff = (dec(prefix, changed)[0, out] - base[0, out]).abs().max().item()
            if not inside:
                assert diff < 1e-5, (rr, cc, diff)
            elif r - rr <= min(layers, 2) and cc == min(c + (r - rr) * half, gw - 1):
                assert diff > 1e-3, (rr, cc, diff)


CASES = [  # (decoder settings, sampling settings, guided)
    (dict(), dict(temperature=1.0), False),
    (dict(), dict(cfg_scale=3.0, temperature=0.9, top_k=8), True),
    (dict(conv_kernel=(3, 5)), dict(temperature=0.0, cfg_scale=2.0), True),
    (dict(conv_kernel=(5, 3), grid_h=4, grid_w=4), dict(temperature=1.0, top_p=0.8, min_p=0.05), False),
    (dict(conv_kernel=(3, 15), grid_h=4, grid_w=6), dict(temperature=1.0), True),  # wider than the grid
    (dict(grid_h=1, grid_w=9), dict(temperature=1.0), False),
    (dict(grid_h=6, grid_w=1, conv_kernel=(3, 1)), dict(temperature=1.0), False),
]


@pytest.mark.parametrize("dec_cfg,settings,guided", CASES)
def test_wavefront_draws_the_raster_tokens(dec_cfg, settings, guided):
    """The headline guarantee: the same tokens as raster decoding (same seed, same draws); the
    engine's raster loop itself equals a plain reference loop."""
    dec = _decoder(seed=3, **dec_cfg)
    classes = [0, 1, 2, 0, 1]
    want = _reference(dec, classes, guided, seed=11, **settings)
    raster, _ = _decode(dec, classes, guided, seed=11, **settings)
    assert torch.equal(raster, want)
    got, stats = _decode(dec, classes, guided, seed=11, decoding="wavefront", **settings)
    assert torch.equal(got, want)
    assert stats.images == 5 and stats.tokens == 5 * dec.cfg.num_tokens
    assert 5 <= stats.passes <= 5 * (dec.cfg.num_tokens + dec.cfg.grid_h)
    assert stats.row_starts_accepted <= stats.row_starts


def test_policies_share_steps_and_keep_their_tokens():
    """Wavefront, SJD and raster requests in one loop, joining at different steps: the wavefront
    and raster images draw the raster tokens, each SJD image the tokens it draws alone."""
    dec = _decoder(seed=3)
    settings = dict(cfg_scale=2.0, temperature=1.0, top_k=8)
    want = _reference(dec, [0, 1, 2], True, seed=20, **settings)
    sjd_alone, _ = _decode(dec, [2, 1], True, seed=40, decoding="sjd", window=5, **settings)
    sched = _scheduler(dec, 16)
    try:
        first = _submit(sched, dec, [0, 1, 2], True, seed=20, **settings)
        while first.progress[0] < 6:
            pass
        wave = _submit(sched, dec, [0, 1, 2], True, seed=20, decoding="wavefront", **settings)
        sjd = _submit(sched, dec, [2, 1], True, seed=40, decoding="sjd", window=5, **settings)
        again = _submit(sched, dec, [0, 1, 2], True, seed=20, **settings)
        n = dec.cfg.num_tokens
        for h in (first, wave, again):
            assert torch.equal(h.result(timeout=600).view(3, n), want)
        assert torch.equal(sjd.result(timeout=600).view(2, n), sjd_alone)
        assert wave.started < first.finished and sjd.started < first.finished  # they shared steps
        assert sched.stats.widest >= 5
    finally:
        sched.close()


def test_wavefront_on_a_text_model():
    eng = sharpen(Engine.from_preset("tiny-t2i", device="cpu"))
    prompts = ["a red circle", "two blue squares at the top", "x"]
    for scale in (1.0, 2.5):
        raster = eng.generate_codes(prompts, seed=4, cfg_scale=scale)
        assert torch.equal(eng.generate_codes(prompts, seed=4, cfg_scale=scale, decoding="wavefront"), raster)
    eng.close()


def test_wavefront_pass_count_when_every_draft_holds():
    """A decoder whose logits depend on the position only (no token embedding, no attention
    output): every drafted row start is right, so
    the pass count is the schedule's own, (grid_h - 1) * (kw // 2) + grid_w (prefill included),
    against grid_h * grid_w for raster."""
    for kernel, (gh, gw) in (((3, 5), (6, 8)), ((3, 3), (4, 5)), ((3, 9), (4, 6))):
        dec = _decoder(conv_kernel=kernel, grid_h=gh, grid_w=gw)
        with torch.no_grad():
            dec.tok_embed.weight.zero_()
            for blk in dec.blocks:  # no attention: a speculative query over part of a row agrees too
                blk.attn.wo.weight.zero_()
        got, stats = _decode(dec, [0, 1], False, decoding="wavefront", temperature=0.0)
        assert torch.equal(got, _reference(dec, [0, 1], False, temperature=0.0))
        # A row starts once the row above has fed kw // 2 + 1 of its tokens (all of them when the
        # kernel is as wide as the grid).
        stagger = min(kernel[1] // 2, gw)
        assert stats.passes == 2 * ((gh - 1) * stagger + gw), (kernel, stats)
        assert stats.passes_per_token == ((gh - 1) * stagger + gw) / (gh * gw)
        assert stats.row_starts == stats.row_starts_accepted == 2 * (gh - 1)


def test_wavefront_needs_every_layer_conv_masked():
    assert "layers [1]" in wavefront_unsupported(_decoder(conv_layers=(0, 2)))
    assert wavefront_unsupported(_decoder()) is None


@pytest.mark.parametrize("decoding", ["wavefront", "sjd"])
def test_edits_with_parallel_decodings_keep_the_kept_tokens(decoding):
    """Kept tokens take the place of the draws: the wavefront gives raster completion's tokens,
    SJD keeps every kept token and draws the rest (greedy: raster's)."""
    dec = _decoder(seed=5)
    n = dec.cfg.num_tokens
    forced = torch.full((n,), -1, dtype=torch.long)
    forced[:9] = torch.arange(9) % dec.cfg.vocab_size  # rows 0 and part of row 1 kept
    forced[20] = 3
    settings = dict(cfg_scale=2.0, temperature=0.0 if decoding == "sjd" else 1.0)
    sched = _scheduler(dec, 4)
    try:
        raster = _submit(sched, dec, [1], True, seed=2, forced=[forced], **settings).result(timeout=600)
        got = _submit(sched, dec, [1], True, seed=2, decoding=decoding, window=4, forced=[forced],
                      **settings).result(timeout=600)
    finally:
        sched.close()
    kept = forced >= 0
    assert torch.equal(got.view(-1)[kept], forced[kept])
    assert torch.equal(got, raster)


def test_parallel_decodings_take_timeouts_and_cancels():
    eng = Engine.from_preset("tiny-t2i", device="cpu", max_batch_size=2)
    for decoding in ("wavefront", "sjd"):
        slow = eng.submit(["a red circle"], num_images=6, seed=1, decoding=decoding, timeout=0.01)
        with pytest.raises(TimeoutError):
            slow.result(timeout=60)
        cancelled = eng.submit(["a red circle"], num_images=6, seed=1, decoding=decoding)
        cancelled.cancel()
        with pytest.raises(Exception, match="cancelled"):
            cancelled.result(timeout=60)
        assert eng.generate_codes(["x"], seed=0, decoding=decoding).shape == (1, 8, 8)
    eng.close()


# ------------------------------------------------------------------------------ SJD


def test_sjd_greedy_is_raster_greedy():
    """At temperature 0 every draft is checked against the argmax: Jacobi decoding, exact."""
    for dec in (_decoder(conv_layers=None), _decoder(conv_layers=(1,)), _llama_decoder()):
        got, stats = _decode(dec, [0, 1, 2], True, decoding="sjd", window=6, temperature=0.0, cfg_scale=2.0)
        assert torch.equal(got, _reference(dec, [0, 1, 2], True, temperature=0.0, cfg_scale=2.0))
        assert stats.passes < 3 * dec.cfg.num_tokens
        assert stats.drafts_accepted <= stats.drafts


def test_sjd_is_deterministic_per_seed_and_batch_independent():
    dec = _decoder()
    a, _ = _decode(dec, [0, 1, 2, 0], False, seed=5, decoding="sjd", window=5, temperature=1.0)
    assert torch.equal(a, _decode(dec, [0, 1, 2, 0], False, seed=5, decoding="sjd", window=5, temperature=1.0)[0])
    # Image 2 alone (its own seed): the same tokens as in the batch.
    alone, _ = _decode(dec, [2], False, seed=7, decoding="sjd", window=5, temperature=1.0)
    assert torch.equal(alone[0], a[2])
    other, _ = _decode(dec, [0, 1, 2, 0], False, seed=50, decoding="sjd", window=5, temperature=1.0)
    assert not torch.equal(a, other)


def _chi2_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample chi-square homogeneity test of category counts ``a``, ``b`` (cells with an
    expected count under 5 pooled into one); the p-value."""
    n_a, n_b = a.sum(), b.sum()
    tot = a + b
    small = tot * min(n_a, n_b) / (n_a + n_b) < 5
    if small.any():
        a = torch.cat([a[~small], a[small].sum()[None]])
        b = torch.cat([b[~small], b[small].sum()[None]])
        tot = a + b
    keep = tot > 0
    a, b, tot = a[keep].double(), b[keep].double(), tot[keep].double()
    ea, eb = tot * n_a / (n_a + n_b), tot * n_b / (n_a + n_b)
    stat = (((a - ea) ** 2) / ea + ((b - eb) ** 2) / eb).sum()
    df = max(len(tot) - 1, 1)
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def _statistics_p(x: torch.Tensor, y: torch.Tensor, vocab: int) -> list[float]:
    """p-values of every position's token marginal and every adjacent pair's joint counts."""
    ps = []
    n = x.shape[1]
    for j in range(n):
        ps.append(_chi2_p(torch.bincount(x[:, j], minlength=vocab), torch.bincount(y[:, j], minlength=vocab)))
    for j in range(n - 1):
        pair = lambda t: torch.bincount(t[:, j] * vocab + t[:, j + 1], minlength=vocab * vocab)  # noqa: E731
        ps.append(_chi2_p(pair(x), pair(y)))
    return ps


@pytest.mark.parametrize("family", ["parti", "llama"])
def test_sjd_samples_the_raster_distribution(family):
    """Chi-square tests of each position's token marginal and each adjacent pair's joint, SJD
    against raster sampling, 3000 images each of a small model with peaked, context-dependent
    logits (guided, top-k), the SJD and raster requests sharing the loop's steps: none rejects at
    a Bonferroni-corrected 1e-3. The same tests tell raster at temperature 1.0 from raster at
    0.8 (p < 1e-6): they can see a difference that size. For Parti's block and LlamaGen's."""
    small = dict(seed=7, std=0.5, vocab_size=6, grid_h=3, grid_w=3, layers=2)
    dec = _decoder(**small, conv_layers=(0,)) if family == "parti" else _llama_decoder(**small)
    n = 3000
    classes = [i % 3 for i in range(n)]
    settings = dict(cfg_scale=1.5, temperature=1.0, top_k=5)
    sched = _scheduler(dec, 4 * n)
    try:
        sjd = _submit(sched, dec, classes, True, seed=10 ** 6, decoding="sjd", window=4, **settings)
        raster = _submit(sched, dec, classes, True, seed=0, **settings)
        raster, sjd = raster.result(timeout=600).view(n, -1), sjd.result(timeout=600).view(n, -1)
    finally:
        sched.close()
    ps = _statistics_p(raster, sjd, 6)
    assert min(ps) > 1e-3 / len(ps), sorted(ps)[:3]
    colder, _ = _decode(dec, classes, True, seed=5 * 10 ** 6, **{**settings, "temperature": 0.8})
    assert min(_statistics_p(raster, colder, 6)) < 1e-6


def test_cfg_probs_ref_is_what_cfg_sample_draws_from():
    torch.manual_seed(0)
    cond, uncond = torch.randn(1, 12) * 2, torch.randn(1, 12)
    cond[0, 3] = float("-inf")
    settings = dict(cfg_scale=2.0, temperature=0.7, top_k=8, top_p=0.9, min_p=0.02)
    p = K.cfg_probs_ref(cond, uncond, **settings)[0]
    assert p[3] == 0 and math.isclose(float(p.sum()), 1.0, rel_tol=1e-6)
    keep = K.cfg_sample_ref(cond.expand(4000, -1), uncond.expand(4000, -1), seed=1, step=torch.arange(4000),
                            **settings)
    counts = torch.bincount(keep, minlength=12)
    assert (counts[p == 0] == 0).all()
    expected = (p * 4000).round().long()
    assert _chi2_p(counts, expected) > 1e-4
    greedy = K.cfg_probs_ref(cond, uncond, cfg_scale=2.0, temperature=0.0)[0]
    assert greedy.sum() == 1 and greedy.argmax() == (uncond + 2.0 * (cond - uncond))[0].nan_to_num(-1e9).argmax()
    assert K.cfg_probs_ref(torch.full((1, 4), float("-inf")), None).sum() == 0


# ------------------------------------------------------------------------------ Engine, CLI


@pytest.fixture(scope="module")
def t2i() -> Engine:
    eng = sharpen(Engine.from_preset("tiny-t2i", device="cpu", max_batch_size=4))
    yield eng
    eng.close()


def test_engine_decodings(t2i):
    prompts = ["a red circle", "green"]
    raster = t2i.generate_codes(prompts, 2, seed=3, cfg_scale=2.0)
    wave = t2i.generate_codes(prompts, 2, seed=3, cfg_scale=2.0, decoding="wavefront")
    assert torch.equal(wave, raster)
    sjd = t2i.generate_codes(prompts, 2, seed=3, cfg_scale=2.0, decoding="sjd", sjd_window=8)
    assert sjd.shape == raster.shape and torch.equal(sjd, t2i.generate_codes(
        prompts, 2, seed=3, cfg_scale=2.0, decoding="sjd", sjd_window=8))
    greedy = dict(seed=3, cfg_scale=2.0, temperature=0.0)
    assert torch.equal(t2i.generate_codes(prompts, **greedy, decoding="sjd"), t2i.generate_codes(prompts, **greedy))


def test_engine_refuses_bad_decoding_arguments(t2i):
    with pytest.raises(ValueError, match="decoding must be one of"):
        t2i.generate_codes("x", decoding="jacobi")
    with pytest.raises(ValueError, match=r"sjd_window must be an int in \[1, 64\]"):
        t2i.generate_codes("x", decoding="sjd", sjd_window=65)
    ring = Engine(t2i.model, t2i.tokenizer, device="cpu", kv_cache="ring")
    with pytest.raises(ValueError, match="decoding='sjd' feeds several tokens per pass and needs the plain KV cache"):
        ring.generate_codes("x", decoding="sjd")
    ring.close()


def test_engine_falls_back_to_raster_for_causal_layers_and_says_so():
    eng = Engine.from_preset("tiny-vim", device="cpu")
    raster = eng.generate_codes(class_ids=[1, 2], seed=4)
    with pytest.warns(UserWarning, match=r"layers \[1\] .* fully causal.*raster order instead"):
        wave = eng.generate_codes(class_ids=[1, 2], seed=4, decoding="wavefront")
    assert torch.equal(wave, raster)
    eng.close()


def test_cli_decoding(tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert cli_main(["generate", "a red circle", "--preset", "tiny-t2i", "--seed", "2", "-q", "-o", str(a)]) == 0
    assert cli_main(["generate", "a red circle", "--preset", "tiny-t2i", "--seed", "2", "-q", "-o", str(b),
                     "--decoding", "wavefront"]) == 0
    assert a.read_bytes() == b.read_bytes()
    capsys.readouterr()
    assert cli_main(["generate", "x", "--preset", "tiny-t2i", "-q", "-o", str(a), "--decoding", "sjd",
                     "--sjd-window", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sjd_window must be an int in [1, 64]" in err
    assert cli_main(["generate", "--preset", "tiny-vim", "--class-id", "1", "-q", "-o", str(a),
                     "--decoding", "wavefront"]) == 0
    err = capsys.readouterr().err  # the fallback, one line
    assert err.startswith("vqim: warning: wavefront decoding needs every decoder layer conv-masked")
    assert err.count("\n") == 1

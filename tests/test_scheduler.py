"""The one decode loop (engine/scheduler.py): batch invariance, admission at step boundaries, one
row for ``cfg_scale = 1``, cancellation, timeouts, failures that stay in their request, a full
queue refused at once, a blocking call larger than the queue, the async API, negative prompts and
partial images. The parallel decodings inside the same loop: tests/test_parallel_decoding.py."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from tests.helpers import assert_equal
from vqim.engine import Engine
from vqim.engine.scheduler import QueueFullError, RequestCancelled

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def t2i() -> Engine:
    eng = Engine.from_preset("tiny-t2i", device="cpu", max_batch_size=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def vim() -> Engine:
    eng = Engine.from_preset("tiny-vim", device="cpu", max_batch_size=4)
    yield eng
    eng.close()


REQUESTS = [  # (prompt, settings): several settings, lengths and guidance on or off
    ("a red circle", dict(seed=5, cfg_scale=3.0)),
    ("two small blue squares at the top left of the image", dict(seed=6, cfg_scale=1.0, temperature=0.8)),
    ("green", dict(seed=7, cfg_scale=2.0, top_k=20, top_p=0.9)),
    ("a purple triangle", dict(seed=8, cfg_scale=1.0, temperature=0.0)),
]


def _alone(eng: Engine) -> list[torch.Tensor]:
    return [eng.generate_codes([p], **kw) for p, kw in REQUESTS]


def _wait_for(cond, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def test_tokens_are_the_same_alone_together_and_joining_at_any_step(t2i):
    """The headline guarantee: a request draws the same tokens whether it runs alone, shares its
    steps with requests of other settings and lengths, or joins a running batch at any step."""
    alone = _alone(t2i)
    # Together, submitted at once from one thread.
    handles = [t2i.submit([p], **kw) for p, kw in REQUESTS]
    for h, want in zip(handles, alone):
        assert_equal(h.result(), want)
    # Each joins a long-running request after a different number of its tokens.
    for k, (p, kw) in enumerate(REQUESTS):
        runner = t2i.submit(["a large yellow circle"], num_images=3, seed=100 + k, cfg_scale=2.0)
        join_at = 1 + 13 * k
        _wait_for(lambda: runner.progress[0] >= join_at, f"{join_at} tokens")
        late = t2i.submit([p], **kw)
        assert_equal(late.result(), alone[k], msg=f"request {k} joining at token {join_at}")
        runner.result()
        assert late.started < runner.finished  # it really joined a running batch


def test_many_threads_share_the_steps_and_each_gets_its_own_image(vim):
    want = {c: vim.generate_codes(class_ids=[c], seed=40 + c) for c in range(8)}
    got, errors = {}, []

    def work(c):
        try:
            got[c] = vim.generate_codes(class_ids=[c], seed=40 + c)
        except Exception as e:  # noqa: BLE001 (recorded for the assert)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for c in range(8):
        assert_equal(got[c], want[c], msg=f"class {c}")


def test_guidance_one_holds_one_row_and_guided_holds_a_pair(vim):
    """max_batch_size=4 is 8 rows: eight unguided images run in one step, guided ones four."""
    sched = vim.scheduler
    for scale, most in ((1.0, 8), (3.0, 4)):
        sched.stats.widest = 0
        vim.submit(class_ids=[1], num_images=8, seed=0, cfg_scale=scale).result()
        assert sched.stats.widest == most, (scale, sched.stats.widest)


def test_a_request_longer_than_the_rows_runs_as_rows_free_up(vim):
    codes = vim.generate_codes(class_ids=[2, 3], num_images=5, seed=9, cfg_scale=3.0)  # 10 images, 4 at a time
    assert codes.shape == (10, 8, 8)
    # Every image, the first ones too: a finished image's tokens must not be the next occupant's.
    for k in range(10):
        i, j = divmod(k, 5)
        assert_equal(codes[k], vim.generate_codes(class_ids=[2 + i], seed=9 + j, cfg_scale=3.0)[0], msg=f"image {k}")


def test_cancel_ends_the_request_and_the_others_go_on(vim):
    other_alone = vim.generate_codes(class_ids=[4], seed=1)
    long = vim.submit(class_ids=[5], num_images=6, seed=2)
    other = vim.submit(class_ids=[4], seed=1)
    _wait_for(lambda: long.progress[0] >= 5, "the long request to start")
    assert long.cancel()
    with pytest.raises(RequestCancelled):
        long.result(timeout=60)
    assert_equal(other.result(timeout=60), other_alone)
    assert vim.generate_codes(class_ids=[4], seed=1).shape == (1, 8, 8)  # the loop goes on


def test_a_queued_request_can_be_cancelled_before_it_starts(vim):
    blocker = vim.submit(class_ids=[1], num_images=8, seed=3)
    queued = vim.submit(class_ids=[2], seed=4)
    queued.cancel()
    with pytest.raises(RequestCancelled):
        queued.result(timeout=60)
    assert blocker.result(timeout=60).shape == (8, 8, 8)


def test_timeout_fails_only_its_request(vim):
    slow = vim.submit(class_ids=[1], num_images=8, seed=5, timeout=0.02)
    with pytest.raises(TimeoutError):
        slow.result(timeout=60)
    assert vim.generate_codes(class_ids=[1], seed=5, timeout=60).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="timeout"):
        vim.submit(class_ids=[1], timeout=0)


@torch.no_grad()
def test_a_non_finite_request_fails_alone_and_the_loop_survives():
    """Class 1's prefix embedding is NaN: its requests have no finite logit and get a
    FloatingPointError; a request stepping beside them gets its own tokens, and later requests
    in the rows the failed ones held are clean (rows are reset on admission)."""
    eng = Engine.from_preset("tiny-vim", device="cpu", max_batch_size=2)
    want = eng.generate_codes(class_ids=[6], seed=12)
    eng.model.decoder.prefix_embed.weight[1] = float("nan")
    bad = eng.submit(class_ids=[1], seed=3)
    good = eng.submit(class_ids=[6], seed=12)
    with pytest.raises(FloatingPointError, match="no finite logit"):
        bad.result(timeout=60)
    assert_equal(good.result(timeout=60), want)
    assert_equal(eng.generate_codes(class_ids=[6, 6], seed=[12, 12]), torch.cat([want, want]))
    eng.close()


def test_an_exception_in_a_step_fails_that_steps_requests_and_the_loop_goes_on(monkeypatch):
    eng = Engine.from_preset("tiny-vim", device="cpu", max_batch_size=2)
    real = eng.model.decoder.decode_step
    calls = []

    def flaky(state, token, pos):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected step failure")
        return real(state, token, pos)

    monkeypatch.setattr(eng.model.decoder, "decode_step", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        eng.generate_codes(class_ids=[1], seed=0)
    monkeypatch.setattr(eng.model.decoder, "decode_step", real)
    fresh = Engine(eng.model, None, device="cpu")
    assert_equal(eng.generate_codes(class_ids=[1], seed=0), fresh.generate_codes(class_ids=[1], seed=0))
    fresh.close()
    eng.close()


def test_a_failing_callback_or_admission_fails_only_its_request(monkeypatch):
    eng = Engine.from_preset("tiny-vim", device="cpu", max_batch_size=4)
    want = eng.generate_codes(class_ids=[2], seed=8)

    def boom(*a):
        raise RuntimeError("callback failed")

    bad = eng.submit(class_ids=[1], seed=1, on_partial=boom)
    good = eng.submit(class_ids=[2], seed=8)
    with pytest.raises(RuntimeError, match="callback failed"):
        bad.result(timeout=60)
    assert_equal(good.result(timeout=60), want)
    # An admission that raises (here: the prefill) fails the new request, not the running one.
    runner = eng.submit(class_ids=[2], num_images=2, seed=8)
    _wait_for(lambda: runner.progress[0] >= 2, "the runner to start")
    real = eng.model.decoder.prefill
    monkeypatch.setattr(eng.model.decoder, "prefill", lambda *a: boom())
    late = eng.submit(class_ids=[3], seed=0)
    with pytest.raises(RuntimeError, match="callback failed"):
        late.result(timeout=60)
    monkeypatch.setattr(eng.model.decoder, "prefill", real)
    assert_equal(runner.result(timeout=60), torch.cat([want, eng.generate_codes(class_ids=[2], seed=9)]))
    eng.close()


def test_a_full_queue_is_refused_at_once():
    """The loop is held inside a step, so the queue's contents are known: one request runs, one
    waits (max_queue=1), the next is refused immediately, never blocked."""
    eng = Engine.from_preset("tiny-vim", device="cpu", max_batch_size=1, max_queue=1)
    release = threading.Event()
    real = eng.model.decoder.decode_step

    def held(state, token, pos):
        release.wait(60)
        return real(state, token, pos)

    eng.model.decoder.decode_step = held
    try:
        running = eng.submit(class_ids=[1], seed=0)
        _wait_for(lambda: running.progress[0] >= 1, "the first request to be admitted")
        waiting = eng.submit(class_ids=[2], seed=0)
        t0 = time.monotonic()
        with pytest.raises(QueueFullError, match="max_queue=1"):
            eng.submit(class_ids=[3], seed=0)
        assert time.monotonic() - t0 < 1.0
    finally:
        release.set()
    assert running.result(timeout=60).shape == waiting.result(timeout=60).shape == (1, 8, 8)
    del eng.model.decoder.decode_step
    eng.close()


def test_async_api_matches_sync_and_task_cancellation_cancels(vim):
    want = vim.generate_codes(class_ids=[2, 7], seed=21)

    async def main():
        got = await vim.agenerate_codes(class_ids=[2, 7], seed=21)
        images = await vim.agenerate(class_ids=[2], seed=21)
        task = asyncio.ensure_future(vim.agenerate_codes(class_ids=[3], num_images=8, seed=1))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return got, images

    got, images = asyncio.run(main())
    assert_equal(got, want)
    assert len(images) == 1 and images[0].size == (64, 64)


def test_negative_prompt_conditions_the_unconditional_branch(t2i):
    plain = t2i.generate_codes(["a red circle"], seed=3, cfg_scale=3.0)
    neg = t2i.generate_codes(["a red circle"], seed=3, cfg_scale=3.0, negative_prompt="blue")
    assert not torch.equal(plain, neg)
    alone = Engine(t2i.model, t2i.tokenizer, device="cpu", max_batch_size=1)
    assert_equal(neg, alone.generate_codes(["a red circle"], seed=3, cfg_scale=3.0, negative_prompt="blue"))
    alone.close()
    # cfg_scale 1 has no unconditional branch: the negative prompt changes nothing.
    assert_equal(t2i.generate_codes(["a red circle"], seed=3, cfg_scale=1.0, negative_prompt="blue"),
                 t2i.generate_codes(["a red circle"], seed=3, cfg_scale=1.0))
    with pytest.raises(ValueError, match="negative_prompt"):
        t2i.generate_codes(["a", "b"], negative_prompt=["x"])


def test_partial_images_show_the_rows_drawn_so_far(t2i):
    seen = []
    handle = t2i.submit(["a red circle"], num_images=2, seed=4, partial_every=2,
                        on_partial=lambda i, grid, rows: seen.append((i, grid.clone(), rows)))
    final = handle.result(timeout=60)
    gh, gw = final.shape[1:]
    assert sorted({(i, r) for i, _, r in seen}) == [(i, r) for i in range(2) for r in range(2, gh, 2)]
    for i, grid, rows in seen:
        assert_equal(grid[:rows], final[i, :rows])
        assert bool((grid[rows:] == -1).all())


def test_submit_checks_everything_before_queueing(vim):
    with pytest.raises(ValueError, match="class_ids"):
        vim.submit(class_ids=[99])
    with pytest.raises(ValueError, match="partial_every"):
        vim.submit(class_ids=[1], partial_every=0)
    with pytest.raises(ValueError, match="negative_prompt"):
        vim.submit(class_ids=[1], negative_prompt="x")
    with pytest.raises(ValueError, match="max_queue"):
        Engine.from_preset("tiny-vim", device="cpu", max_queue=0)


@pytest.mark.gpu
def test_cuda_graph_buckets_draw_the_eager_tokens():
    """On CUDA the loop replays the step captured for the bucket of rows in use; the tokens equal
    the loop without graphs, alone and with requests joining (several buckets)."""
    graphs = Engine.from_preset("tiny-t2i", device="cuda", max_batch_size=4)
    eager = Engine(graphs.model, graphs.tokenizer, device="cuda", max_batch_size=4, use_cuda_graph=False)
    for eng in (graphs, eager):
        eng.results = [h.result(timeout=120) for h in [eng.submit([p], **kw) for p, kw in REQUESTS]]
        eng.results.append(eng.generate_codes(["a red circle"], num_images=3, seed=1, cfg_scale=2.0))
    assert sorted(graphs.scheduler.runner._graphs) == [1, 2, 4, 8]
    for a, b in zip(graphs.results, eager.results):
        assert_equal(a, b)
    graphs.close()
    eager.close()


# ----------------------------------------------------------------------------- image-conditioned generation


@torch.no_grad()
def test_completion_keeps_the_top_rows_and_samples_the_rest_from_the_model(t2i):
    """Raster completion: the kept rows are the image's tokens, and every drawn token is the draw
    (same seed, same step) from the model's guided distribution given all tokens before it,
    which is what makes completion exact."""
    from vqim import kernels as K
    from vqim.engine.requests import condition

    image = t2i.decode_codes(t2i.generate_codes(["a blue square"], seed=1), output_type="pt")[0]  # (3, H, W)
    source = t2i.encode_images(image[None])[0]  # (g, g)
    kept = 3
    out = t2i.generate_codes(["a red circle"], seed=7, cfg_scale=2.0, image=image, keep=kept)[0]
    assert_equal(out[:kept], source[:kept])
    assert_equal(t2i.generate_codes(["a red circle"], seed=7, cfg_scale=2.0, image=image, keep=kept)[0], out)
    dec = t2i.model.decoder
    n = dec.cfg.num_tokens
    prefix, memory, mask, _ = condition(t2i.model, t2i.tokenizer, ["a red circle", ""])
    logits = dec(prefix, out.view(1, -1).repeat(2, 1)[:, : n - 1], memory, mask)  # (2, n, V)
    start = kept * dec.cfg.grid_w
    for t in range(start, n):
        want = K.cfg_sample(logits[:1, t], logits[1:, t], seed=7, step=t, cfg_scale=2.0,
                            temperature=t2i.sampling_defaults["temperature"])
        assert int(want) == int(out.view(-1)[t]), t


def test_progress_counts_no_token_before_the_prefill_draws_one(t2i):
    """An admitted image counts in its request's progress from admission (it holds rows), but
    has no token until its prefill draws the first: progress read in between is 0, not the
    loop's whole step count (which it was, for a request joining a loop that had run)."""
    t2i.generate_codes(["a red circle"], seed=0, decoding="raster")  # the loop's clock runs ahead
    sch = t2i.scheduler
    entered, release = threading.Event(), threading.Event()
    prefill = sch._prefill

    def held(images):
        entered.set()
        assert release.wait(60)
        prefill(images)

    sch._prefill = held
    try:
        h = t2i.submit(["a blue square"], 2, seed=1, decoding="raster")
        assert entered.wait(60)
        n = t2i.cfg.decoder.num_tokens
        assert h.progress == (0, 2 * n)
    finally:
        release.set()
        del sch._prefill
    h.result(timeout=60)
    assert h.progress == (2 * n, 2 * n)


def test_kept_tokens_hold_when_an_edit_joins_and_leaves_a_running_batch(t2i):
    """The loop skips the kept-token lookup while no image in it keeps tokens: an edit that joins
    a running plain request turns it back on (its kept rows are the source's), and after it
    leaves the plain images go on as alone; every image's tokens are its solo run's."""
    image = t2i.decode_codes(t2i.generate_codes(["a blue square"], seed=1), output_type="pt")[0]  # (3, H, W)
    source = t2i.encode_images(image[None])[0]  # (g, g)
    # Raster: the loop's step is then the runner's raster step ("auto" takes the wavefront here).
    edit = dict(seed=7, cfg_scale=2.0, image=image, keep=2, decoding="raster")
    plain_alone = t2i.generate_codes(["a red circle"], num_images=3, seed=4, decoding="raster")
    edit_alone = t2i.generate_codes(["a green circle"], **edit)
    assert_equal(edit_alone[0, :2], source[:2])
    for _ in range(3):
        plain = t2i.submit(["a red circle"], 3, seed=4, decoding="raster")
        while plain.progress[0] < 3 * 8:  # a few rows in: the loop runs without the lookup
            time.sleep(0.001)
        joined = t2i.submit(["a green circle"], **edit)
        assert_equal(joined.result(timeout=120), edit_alone)
        assert_equal(plain.result(timeout=120), plain_alone)


def test_a_kept_mask_is_kept_and_bad_masks_are_named(t2i):
    image = torch.rand(3, 64, 64)
    source = t2i.encode_images(image[None])[0]
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:5, 1:6] = True
    out = t2i.generate_codes(["a red circle"], seed=3, image=image, keep=mask)[0]
    assert_equal(out[mask], source[mask])
    assert not torch.equal(out[~mask], source[~mask])
    bad = [(dict(image=image), "both image and keep"), (dict(keep=2), "both image and keep"),
           (dict(image=image, keep=9), r"keep must be a number of top grid rows in \[0, 8\]"),
           (dict(image=image, keep=torch.zeros(4, 4, dtype=torch.bool)), r"bool mask \[8, 8\]"),
           (dict(image=image, keep=torch.zeros(8, 8)), r"bool mask \[8, 8\]"),
           (dict(image=torch.rand(3, 32, 32), keep=2), r"image\[0\]"),
           (dict(image=[image, image], keep=2), "one value or a list of 1")]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            t2i.generate_codes(["a red circle"], seed=3, **kw)


def test_cli_edit_keeps_rows_and_masks(tmp_path, capsys):
    from PIL import Image

    from vqim.train.main import main

    eng = Engine.from_preset("tiny-t2i", device="cpu")
    src = eng.generate(["a blue square"], seed=1)[0]
    src.save(tmp_path / "in.png")
    image = torch.from_numpy(np.asarray(src, dtype=np.float32) / 255).permute(2, 0, 1)
    want = eng.decode_codes(eng.generate_codes(["a red circle"], seed=5, image=image, keep=2))[0]
    out = tmp_path / "out.png"
    assert main(["edit", str(tmp_path / "in.png"), "a red circle", "--keep-rows", "2", "--preset", "tiny-t2i",
                 "--device", "cpu", "--seed", "5", "-q", "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im), np.asarray(want))
    mask = Image.new("L", (8, 8))
    mask.paste(255, (0, 0, 8, 3))  # the top three token rows
    mask.save(tmp_path / "mask.png")
    assert main(["edit", str(tmp_path / "in.png"), "a red circle", "--mask", str(tmp_path / "mask.png"),
                 "--preset", "tiny-t2i", "--device", "cpu", "--seed", "5", "-q", "-o", str(out)]) == 0
    want3 = eng.decode_codes(eng.generate_codes(["a red circle"], seed=5, image=image, keep=3))[0]
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im), np.asarray(want3))
    capsys.readouterr()
    assert main(["edit", str(tmp_path / "in.png"), "x", "--preset", "tiny-t2i", "-o", str(out)]) == 2
    assert "exactly one of --keep-rows" in capsys.readouterr().err
    Image.new("L", (5, 5)).save(tmp_path / "bad.png")
    assert main(["edit", str(tmp_path / "in.png"), "x", "--mask", str(tmp_path / "bad.png"), "--preset", "tiny-t2i",
                 "-o", str(out)]) == 2
    assert "--mask" in capsys.readouterr().err

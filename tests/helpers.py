"""Asserts and tolerance rules shared by the kernel tests.

The tolerance rule (DESIGN §6): a kernel's error against a high-precision reference may be at
most ``factor`` (2) times the error of the same computation done by plain PyTorch in the
kernel's dtype, plus a floor for the case where PyTorch happens to be exact.
"""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Smallest relative spacing of each dtype; used for floors, never as the only tolerance.
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


def _first_mismatches(bad: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor, limit: int = 5) -> str:
    idx = bad.nonzero()[:limit]
    rows = []
    for i in idx:
        key = tuple(int(v) for v in i)
        rows.append(f"  at {key}: got {actual[key].item()!r}, expected {expected[key].item()!r}")
    return "\n".join(rows)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0, msg: str = "") -> None:
    """torch.testing-style closeness that prints the first mismatching indices."""
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    bad |= a.isnan() != e.isnan()
    if bad.any():
        n = int(bad.sum())
        raise AssertionError(
            f"{msg} {n}/{a.numel()} elements differ (atol={atol:.3g}, rtol={rtol:.3g}, "
            f"max abs err {(a - e).abs().nan_to_num(0).max().item():.3g}); first:\n"
            + _first_mismatches(bad, a, e)
        )


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Exact equality with the first mismatching indices in the message."""
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    bad = a != e
    if bad.any():
        raise AssertionError(f"{msg} {int(bad.sum())}/{a.numel()} elements differ; first:\n" + _first_mismatches(bad, a, e))


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def assert_within_torch_error(
    actual: torch.Tensor,
    ref_hi: torch.Tensor,
    torch_lowp: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float | None = None,
    msg: str = "",
) -> None:
    """|actual - ref_hi| <= factor * max|torch_lowp - ref_hi| + floor.

    ``ref_hi`` is the computation in float64 (or float32 for low-precision kernels);
    ``torch_lowp`` the same computation by plain PyTorch in the kernel's dtype.
    """
    torch_err = max_abs_err(torch_lowp, ref_hi)
    if floor is None:
        floor = EPS[actual.dtype if actual.dtype in EPS else torch.float32] * max(1.0, ref_hi.abs().max().item())
    assert_close(actual, ref_hi, atol=factor * torch_err + floor, msg=f"{msg} (torch's own error {torch_err:.3g})")


def sharpen(engine, std: float = 0.3):
    """Larger random weights (in place) so an engine's logits are far from uniform: conditions
    matter, and extreme sampling settings overflow them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return engine


@torch.no_grad()
def raster_reference(dec, rows, guided: bool, seeds: torch.Tensor, **settings) -> torch.Tensor:
    """Raster decoding by a plain loop over ``ARDecoder.prefill`` / ``decode_step`` and the
    sampler's reference: tokens ``[B, n]`` of ``rows`` (``requests.Rows``: ``R = 2B`` rows,
    conditional then unconditional, when ``guided``), image ``i`` drawn with ``seeds[i]``. The
    oracle the engine's decode loop is checked against; it shares none of the loop's code."""
    from vqim import kernels as K

    prefix, memory, mask, prefix_len = rows
    r = prefix.shape[0]
    b = r // 2 if guided else r
    cfg = dec.cfg
    state = dec.new_state(r, memory, mask)
    logits = dec.prefill(state, prefix, prefix_len)  # (R, V)
    out = []
    for i in range(cfg.num_tokens):
        if i:
            fed = out[-1].clamp_min(0)
            logits = dec.decode_step(state, torch.cat([fed, fed]) if guided else fed, prefix_len + i - 1)
        out.append(K.cfg_sample_ref(logits[:b], logits[b:] if guided else None, seed=seeds, step=i, validate=False,
                                    **settings))
    return torch.stack(out, 1)  # (B, n)

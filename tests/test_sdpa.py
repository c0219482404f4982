"""`cogvideo.sdpa`: attention from bf16 inputs computed in fp32 inside `fp32_attention`, held
against a float64 reference by a bound, its masks' meaning kept, and every family's attention
going through it.

Bound: computed in fp32 and rounded once to bf16, an output (or a gradient) x differs from the
float64 reference r by at most half a bf16 unit in the last place, u |r| with u = 2^-8, plus
fp32's own error: sums of n = L + d terms, each off by at most gamma_n ~ n 2^-24 of the largest
term, taken 8 times over.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cogvideo import sdpa as sdpa_module
from cogvideo.sdpa import fp32_attention, sdpa

ROOT = Path(__file__).resolve().parents[1]
N, H, L, D = 2, 3, 17, 16


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(N, H, L, D, generator=g).to(torch.bfloat16) for _ in range(4))
    keep = torch.rand(N, 1, L, L, generator=g) < 0.6
    keep[..., 0] = True  # every query sees at least one key
    additive = torch.where(keep, torch.randn(N, 1, L, L, generator=g), float("-inf")).to(torch.bfloat16)
    return q, k, v, grad, {"bool": keep, "additive": additive, "none": None}


def forward_backward(attention, q, k, v, grad, mask):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, attn_mask=mask)
    out.backward(grad.to(out.dtype))
    return [out.detach(), *(t.grad for t in leaves)]


def outside_bound(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest |got - ref| beyond the bound (module docstring); <= 0 within it."""
    fp32_error = 8 * (L + D) * 2.0**-24 * ref.abs().max()
    excess = (got.double() - ref).abs() - (2.0**-8 * ref.abs() + fp32_error)
    return float(excess.max())


@pytest.mark.parametrize("mask", ["bool", "additive", "none"])
def test_fp32_attention_of_bf16_inputs_is_within_one_rounding_of_float64(mask):
    q, k, v, grad, masks = inputs()
    with fp32_attention():
        got = forward_backward(sdpa, q, k, v, grad, masks[mask])
    ref_mask = masks[mask].double() if mask == "additive" else masks[mask]
    ref = forward_backward(F.scaled_dot_product_attention, *(t.double() for t in (q, k, v, grad)), ref_mask)
    for name, g, r in zip(("output", "dq", "dk", "dv"), got, ref):
        assert g.dtype == torch.bfloat16, name  # returned in the inputs' dtype
        assert outside_bound(g, r) <= 0, name


def test_a_bool_mask_read_as_additive_fails_the_bound():
    """Planted: the upcast casting a bool mask to float (0/1 added to the scores, nothing masked)."""
    q, k, v, grad, masks = inputs()
    ref = forward_backward(
        F.scaled_dot_product_attention, *(t.double() for t in (q, k, v, grad)), masks["bool"]
    )
    with fp32_attention():
        got = forward_backward(sdpa, q, k, v, grad, masks["bool"].to(torch.bfloat16))
    assert outside_bound(got[0], ref[0]) > 0


def recorded_dtypes(monkeypatch) -> list[torch.dtype]:
    """The query dtype of every scaled_dot_product_attention call from here on."""
    calls, kernel = [], F.scaled_dot_product_attention

    def record(q, *args, **kwargs):
        calls.append(q.dtype)
        return kernel(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    return calls


def test_only_inside_an_enabled_block_and_only_low_precision_inputs(monkeypatch):
    q, k, v, _, masks = inputs()
    calls = recorded_dtypes(monkeypatch)
    plain = sdpa(q, k, v, attn_mask=masks["bool"])
    with fp32_attention():
        sdpa(q, k, v)
        sdpa(q.float(), k.float(), v.float())
        with fp32_attention(False):  # nested: the inner block's choice, restored on leaving it
            inner = sdpa(q, k, v, attn_mask=masks["bool"])
        sdpa(q, k, v)
    sdpa(q, k, v)
    assert calls == [
        torch.bfloat16,
        torch.float32,
        torch.float32,
        torch.bfloat16,
        torch.float32,
        torch.bfloat16,
    ]
    assert torch.equal(plain, inner)
    assert torch.equal(plain, F.scaled_dot_product_attention(q, k, v, attn_mask=masks["bool"]))


def family_attention_calls() -> dict:
    """One bf16 call of each family's own attention code."""
    from cogvideo.models.cogvideo.attention import attend  # CogVideo's and the super-resolution's
    from cogvideo.models.glober.dit import SelfAttention
    from cogvideo.models.hpdm.model import Attention

    q, k, v, _, masks = inputs()
    x = torch.randn(N, L, 32).to(torch.bfloat16)
    torch.manual_seed(0)
    glober, hpdm = SelfAttention(32, 4).to(torch.bfloat16), Attention(32, 32, 8).to(torch.bfloat16)
    return {
        "cogvideo": lambda: attend(q, k, v, masks["bool"]),
        "glober": lambda: glober(x, torch.ones(N, L, dtype=torch.bool)),
        "hpdm": lambda: hpdm(x),
    }


@pytest.mark.parametrize("family", ["cogvideo", "glober", "hpdm"])
def test_every_familys_attention_computes_in_fp32_inside_the_block(family, monkeypatch):
    call = family_attention_calls()[family]
    calls = recorded_dtypes(monkeypatch)
    with fp32_attention():
        out = call()
    assert calls and set(calls) == {torch.float32}
    assert out.dtype == torch.bfloat16
    calls.clear()
    call()
    assert set(calls) == {torch.bfloat16}


def test_the_library_calls_the_kernel_only_through_sdpa():
    """A family that called F.scaled_dot_product_attention itself would ignore the run's choice."""
    callers = []
    for path in sorted((ROOT / "cogvideo").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "scaled_dot_product_attention"
            ):
                callers.append(str(path.relative_to(ROOT)))
    assert callers and set(callers) == {Path(sdpa_module.__file__).relative_to(ROOT).as_posix()}

"""The rewrites that cut the ops (kernel launches) of a training step compute what the formulas they replaced did:
RoPE as a complex product, RMSNorm through F.rms_norm, fixed tables made once (benchmarks/step_ops.py
counts the ops)."""

import pytest
import torch

from mm_llama.llama import LlamaConfig, RMSNorm, apply_rope, rope_frequencies, rope_table


def explicit_rope(x, positions, inv_freq):
    """RoPE as it was written before: cos/sin per pair, four products, a difference and a sum, stacked, in fp32."""
    angles = positions.float()[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2).type_as(x)


def explicit_rms_norm(x, weight, eps):
    """Meta's RMSNorm as it was written before: normalise in fp32, cast back, then scale."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("traced", [False, True])
def test_rope_equals_the_explicit_formula_forward_and_backward(dtype, per_row, traced):
    # Eager: the complex product. Traced by torch.compile (here with the eager backend: no code generated, fast):
    # the formula written out, which inductor fuses.
    inv_freq = rope_frequencies(LlamaConfig.preset("debug", dim=128, n_heads=4, n_kv_heads=2))  # head dim 32
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 5000, (2, 70), generator=g) if per_row else torch.arange(70)  # every scaling band
    x = torch.randn(2, 70, 6, 32, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(2, 70, 6, 32, generator=g).to(dtype)
    expected = explicit_rope(x, positions, inv_freq)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    rope = torch.compile(apply_rope, backend="eager", fullgraph=True) if traced else apply_rope
    got = rope(x, rope_table(positions, inv_freq))
    (got_grad,) = torch.autograd.grad(got, x, grad)
    assert got.dtype == dtype
    # The same fp32 products and sums, rounded alike (on CUDA the complex kernel may fuse a product and a sum: fp32
    # rounding).
    assert torch.equal(got, expected) and torch.equal(got_grad, expected_grad)


@pytest.mark.parametrize(("x_dtype", "w_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_rms_norm_equals_metas_formula_in_every_dtype_mix(x_dtype, w_dtype):
    # The mixes autocast training meets: bf16 activations with fp32 (trainable) or bf16 (frozen) weights, and the
    # fp32 stream after a gated block. On the CPU F.rms_norm runs the same ops as the formula: bit-equal, gradients
    # too; on CUDA its fused kernel reduces in another order (fp32 rounding).
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, eps=1e-5).to(w_dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=g))
    x = (3 * torch.randn(2, 5, 48, generator=g)).to(x_dtype).requires_grad_()
    grad_out = torch.randn(2, 5, 48, generator=g)
    expected = explicit_rms_norm(x, norm.weight, norm.eps)
    expected_grads = torch.autograd.grad(expected, (x, norm.weight), grad_out.to(expected.dtype))
    got = norm(x)
    got_grads = torch.autograd.grad(got, (x, norm.weight), grad_out.to(got.dtype))
    assert got.dtype == expected.dtype == torch.promote_types(x_dtype, w_dtype)
    assert torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, expected_grads, strict=True))


def test_patch_position_table_is_made_once_per_device_and_dtype_and_equals_a_fresh_one():
    from adapters.image import VisionProjection
    from encoders.vision import VisionConfig
    from encoders.vision_blocks import patch_position_table

    config = VisionConfig.preset("debug", tile_size=84, max_tiles=1, patch_position_features=True)
    projection = VisionProjection(config, 64)
    features = torch.randn(2, 1, 1, config.tokens_per_tile, config.output_dim)
    with torch.inference_mode():  # generation first: the cached table must still serve training afterwards
        first = projection(features)
    tokens = torch.nn.functional.linear(features, projection.weight, projection.bias)
    loudness = tokens.pow(2).mean(-1, keepdim=True).sqrt()
    assert torch.equal(first, tokens + loudness * patch_position_table(6, 64))  # the recomputed table, exactly
    out = projection(features)
    out.sum().backward()  # saves the table for the gradient of position_scale: not an inference tensor
    assert torch.equal(out, first) and projection.position_scale.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = projection(features)
    assert bf16.dtype == torch.bfloat16


def test_pad_token_layout_is_reused_and_unchanged():
    from encoders.vision_blocks import PadTokens

    a, b = PadTokens.layout(4, 5, 8, torch.device("cpu")), PadTokens.layout(4, 5, 8, "cpu")
    assert a.real is b.real  # one table, not one per forward
    expected = (torch.arange(8) < 5).repeat(4)[None]
    assert torch.equal(a.real, expected) and not PadTokens.layout(4, 6, 8, "cpu").real.equal(expected)

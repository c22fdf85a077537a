"""One-pass capture equals timm's own eager attention and leaves the model exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import ResPostBlock

from vitviz.errors import ModelError, ParameterError
from vitviz.walk.capture import attention_forward, capture_attention, check_capturable

from .helpers import eager_reference, hook_state, tiny_vit

VARIANTS = {
    "plain": dict(),
    "qk_norm+layerscale": dict(qk_norm=True, init_values=1e-1),
    "registers": dict(reg_tokens=3),
    "registers_no_embed_class": dict(reg_tokens=2, no_embed_class=True),
    "respost": dict(block_fn=ResPostBlock),
    "non_square": dict(img_size=(24, 40)),
    "distilled": dict(arch="deit_tiny_distilled_patch16_224"),
}


def _build(variant: str):
    kwargs = dict(VARIANTS[variant])
    arch = kwargs.pop("arch", "vit_tiny_patch16_224")
    return tiny_vit(arch, **kwargs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_capture_equals_eager_attention_and_features(variant):
    model = _build(variant)
    h, w = model.patch_embed.img_size
    x = torch.randn(2, 3, h, w)
    want_attn, want_feats = eager_reference(model, x)
    with torch.no_grad():
        fused_feats = model.forward_features(x)  # the shared model keeps fused attention (SDPA)
    cap = attention_forward(model, x)
    T = model.patch_embed.num_patches + model.num_prefix_tokens
    assert cap.attention.shape == (2, len(model.blocks), model.blocks[0].attn.num_heads, T, T)
    torch.testing.assert_close(cap.attention, want_attn, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cap.features, want_feats, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cap.features, fused_feats, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cap.attention.sum(-1), torch.ones(cap.attention.shape[:-1]), atol=1e-5, rtol=0)



@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attention_only_capture_skips_the_features_but_not_the_last_layer(variant):
    """features=False stops after the last layer's probabilities: the same attention, bit for bit, and no features."""
    model = _build(variant)
    h, w = model.patch_embed.img_size
    x = torch.randn(2, 3, h, w)
    full = attention_forward(model, x)
    only = attention_forward(model, x, features=False)
    assert only.features is None
    assert torch.equal(only.attention, full.attention)
    half = attention_forward(model, x, features=False, store_dtype=torch.float16)  # the scratch path, last layer too
    torch.testing.assert_close(half.attention[:, -1].float(), eager_reference(model, x)[0][:, -1], atol=1e-3, rtol=0)

def test_capture_leaves_no_hook_flag_or_weight_change_even_on_error():
    model = tiny_vit()
    before = hook_state(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(before[1]), "timm should default to fused attention here"
    capture_attention(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(ParameterError, match=r"\(B, 3, 32, 32\)"):
        attention_forward(model, torch.randn(1, 3, 40, 40))

    class Boom(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    real_mlp = model.blocks[1].mlp
    model.blocks[1].mlp = Boom()  # fail part way through the walk
    with pytest.raises(RuntimeError, match="boom"):
        attention_forward(model, torch.randn(1, 3, 32, 32))
    model.blocks[1].mlp = real_mlp
    after = hook_state(model)
    assert after[0] == before[0] == 0
    assert after == before  # flags, modes, requires_grad and attributes too
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_capture_is_thread_safe_on_one_shared_model():
    from concurrent.futures import ThreadPoolExecutor

    model = tiny_vit()
    xs = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    alone = [capture_attention(model, x) for x in xs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda x: capture_attention(model, x), xs))
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(a, b)


def test_training_mode_and_non_vit_are_refused():
    model = tiny_vit().train()
    with pytest.raises(ModelError, match="eval"):
        attention_forward(model, torch.randn(1, 3, 32, 32))
    import timm

    with pytest.raises(ModelError, match="not a plain Vision Transformer"):
        check_capturable(timm.create_model("resnet18", pretrained=False))
    with pytest.raises(ModelError, match="no CLS token and its head pools the tokens by 'max'"):
        check_capturable(tiny_vit(class_token=False, global_pool="max"))  # CLS-less avg/map models are read


def test_half_precision_storage_and_dtype_handling():
    """The GPU path stores attention in half and computes softmax in fp32; checked here on CPU with bf16 weights."""
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    ref = capture_attention(model, x)
    half = copy.deepcopy(model).to(torch.bfloat16)
    got = capture_attention(half, x.to(torch.bfloat16), store_dtype=torch.float16)
    assert got.dtype == torch.float16 and got.device.type == "cpu"
    torch.testing.assert_close(got.float().sum(-1), torch.ones(got.shape[:-1]), atol=2e-2, rtol=0)
    assert (got.float() - ref).abs().max() < 0.1


def test_empty_capture_is_an_error():
    from vitviz.errors import CaptureError

    model = tiny_vit(depth=0)
    with pytest.raises(CaptureError, match="no transformer blocks"):
        attention_forward(model, torch.randn(1, 3, 32, 32))


def _intermediates(model, x):
    """timm's own block outputs on the shared (fused) model: (B, L, T, D), prefix tokens first, no final norm."""
    with torch.no_grad():
        got = model.forward_intermediates(
            x, norm=False, output_fmt="NLC", return_prefix_tokens=model.num_prefix_tokens > 0, intermediates_only=True
        )
    if model.num_prefix_tokens:
        got = [torch.cat([prefix, patches], dim=1) for patches, prefix in got]  # timm hands them back apart
    return torch.stack(got, dim=1)


def _eager_tokens(model, x):
    """The eager (unfused) reference's block outputs, read by hooks on a private copy."""
    ref = copy.deepcopy(model)
    outs = []
    for blk in ref.blocks:
        blk.attn.fused_attn = False
        blk.register_forward_hook(lambda _m, _i, out: outs.append(out.detach()))
    with torch.no_grad():
        ref.forward_features(x)
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("features", [True, False])
def test_tokens_equal_forward_intermediates_and_keep_the_attention_bit_equal(variant, features):
    """Every block's output from the same pass: timm's forward_intermediates (fused) and the eager path agree with it,
    prefix tokens first; the attention is the very same as without tokens, and the last block runs to its end."""
    model = _build(variant)
    h, w = model.patch_embed.img_size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    plain = attention_forward(model, x, features=features)
    cap = attention_forward(model, x, features=features, tokens=True)
    assert plain.tokens is None
    T = model.patch_embed.num_patches + model.num_prefix_tokens
    assert cap.tokens.shape == (2, len(model.blocks), T, model.embed_dim)
    assert cap.tokens.dtype == torch.float32 and cap.tokens.device.type == "cpu"
    torch.testing.assert_close(cap.tokens, _intermediates(model, x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cap.tokens, _eager_tokens(model, x), atol=1e-4, rtol=1e-4)
    assert torch.equal(cap.attention, plain.attention)
    if features:
        assert torch.equal(cap.features, plain.features)
        with torch.inference_mode():
            torch.testing.assert_close(cap.features, model.norm(cap.tokens[:, -1]), atol=1e-6, rtol=0)
    else:
        assert cap.features is None


def test_tokens_follow_the_store_dtype_and_device():
    """Half storage keeps the tokens in half too (the attention's rule), and store_device=None leaves them in place."""
    model = tiny_vit(reg_tokens=2, img_size=(24, 40))
    x = torch.randn(1, 3, 24, 40)
    ref = attention_forward(model, x, tokens=True).tokens
    half = attention_forward(model, x, tokens=True, store_dtype=torch.float16, features=False)
    assert half.tokens.dtype == torch.float16 and half.attention.dtype == torch.float16
    torch.testing.assert_close(half.tokens.float(), ref, atol=1e-2, rtol=1e-2)
    here = attention_forward(model, x, tokens=True, store_device=None)
    assert torch.equal(here.tokens, ref)

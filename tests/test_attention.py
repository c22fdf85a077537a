"""One-pass capture equals timm's own eager attention and leaves the model exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import ResPostBlock

from vitviz.attention import attention_forward, capture_attention, check_capturable
from vitviz.errors import ModelError, ParameterError

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
    before, weights = hook_state(model), {k: v.clone() for k, v in model.state_dict().items()}
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
    assert after == before and before[0] == 0
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
    with pytest.raises(ModelError, match="CLS"):
        check_capturable(tiny_vit(class_token=False, global_pool="avg"))


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

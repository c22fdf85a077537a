"""The sidebar: one function per group, each drawing its widgets and returning a frozen dataclass of the choices."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from vitviz.analysis.onepass import max_square_size
from vitviz.device import available_devices, pick_device, pick_dtype
from vitviz.errors import VitvizError
from vitviz.inputs.image import IMAGE_SUFFIXES, MAX_UPLOAD_BYTES
from vitviz.models import (
    CHECKPOINT_SUFFIXES,
    ModelSource,
    check_arch,
    hub_cached,
    is_hf_folder,
    list_pretrained_vits,
    patch_size_range,
)
from vitviz.models.checkpoints import MAX_CHECKPOINT_UPLOAD_BYTES, upload_param_cap
from vitviz.settings import FITS

from .cache import digest
from .state import COLORSCALE_LABELS, COLORSCALES, app_model, keep
from .widgets import fail

__all__ = ["ImageChoice", "ModelChoice", "InputChoice", "DisplayChoice", "image_ui", "second_image_ui",
           "model_ui", "input_ui", "display_ui", "ASSETS"]

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # the package's example images (the checkout's assets/)
if not ASSETS.is_dir():
    ASSETS = Path(__file__).resolve().parents[2] / "assets"
HUB_MODELS = (
    "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "deit_small_patch16_224",
    "vit_small_patch14_dinov2.lvd142m",
    "vit_small_patch14_reg4_dinov2.lvd142m",
    "vit_small_patch16_dinov3.lvd1689m",  # Eva blocks: rotary positions, 4 registers
    "vit_base_patch16_siglip_224.webli",  # no CLS token: read through its attention-pool head
)
UPLOAD, OTHER_HUB, DIR_PREFIX = "upload", "hub:other", "dir:"
TRAINED, TRAINED_KEY = "trained", "_trained_ckpt"  # a model trained or probed on the Train & probe page
IMG_MIN, IMG_MAX = 112, 518


@dataclass(frozen=True)
class ImageChoice:
    data: bytes
    name: str
    digest: str  # sha256 of data


@dataclass(frozen=True)
class ModelChoice:
    name: str  # "default", a timm name, a checkpoint path, or "upload:<sha256>"
    arch: str | None
    upload: bytes | None = None  # an uploaded checkpoint's bytes
    filename: str | None = None  # its name as the user gave it


@dataclass(frozen=True)
class InputChoice:
    patch_size: int
    img_size: int
    fit: str
    device: str
    precision: str


@dataclass(frozen=True)
class DisplayChoice:
    opacity: float  # of the maps over the image
    colorscale: str


def _upload_limits() -> str:
    """What this server takes as an uploaded model, in one line under the uploader."""
    cap = upload_param_cap()
    models = "models of any size" if cap is None else f"models of up to {cap / 1e6:,.0f} million parameters"
    return f"Up to {MAX_CHECKPOINT_UPLOAD_BYTES // 10**6} MB a file; {models} (the operator's limits)."


def image_ui() -> ImageChoice | None:
    sb = st.sidebar
    sb.header("Image")
    upload = sb.file_uploader("Upload an image", type=[s.lstrip(".") for s in IMAGE_SUFFIXES], key="upload",
                              help=f"JPEG, PNG, WebP, BMP, GIF or TIFF, up to {MAX_UPLOAD_BYTES // 10**6} MB.")
    examples = sorted(p.name for p in ASSETS.glob("*.jpg"))
    example = sb.selectbox("...or an example", examples, key="example", index=None, placeholder="Choose an example",
                           help="Public-domain photos from scikit-image. An upload takes precedence.")
    if upload is not None:
        data, name = upload.getvalue(), upload.name
    elif example is not None:
        data, name = (ASSETS / example).read_bytes(), example
    else:
        return None
    return ImageChoice(data, name, digest(data))


def checkpoint_dir() -> Path | None:
    """The operator's folder of checkpoints (VITVIZ_CHECKPOINT_DIR), read on every run; users never type paths."""
    folder = os.environ.get("VITVIZ_CHECKPOINT_DIR", "")
    return Path(folder) if folder else None


def second_image_ui() -> ImageChoice | None:
    """An optional second image for the feature views (PCA on one basis, correspondence)."""
    upload = st.sidebar.file_uploader("A second image (patch features, similarity)", key="upload2",
                                      type=[s.lstrip(".") for s in IMAGE_SUFFIXES],
                                      help="Compared with the first at the same model and settings.")
    if upload is None:
        return None
    data = upload.getvalue()
    return ImageChoice(data, upload.name, digest(data))


def checkpoint_files() -> list[str]:
    folder = checkpoint_dir()
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES or is_hf_folder(p))  # transformers


def model_label(choice: str) -> str:
    if choice == "default":
        name = app_model()[0]
        return "Embedded DINOv2 ViT-S/14 (offline)" if name == "default" else f"{Path(name).name} (app)"
    if choice == UPLOAD:
        return "Upload a checkpoint..."
    if choice == TRAINED:
        return "Trained or probed here (Train & probe page)"
    if choice == OTHER_HUB:
        return "Another timm ViT from the Hub..."
    if choice.startswith(DIR_PREFIX):
        return f"Checkpoint: {choice.removeprefix(DIR_PREFIX)}"
    return f"{choice} ({'cached' if hub_cached(choice) else 'Hub, needs internet'})"


def _hub_other() -> ModelChoice:
    """A choice from timm's registry, never free text."""
    name = st.sidebar.selectbox(
        "timm model", list_pretrained_vits(), key="hub_name", index=None, placeholder="Type to search, e.g. deit_base",
        format_func=lambda n: f"{n} (cached)" if hub_cached(n) else n,
        help="Any pretrained timm ViT; its weights come from the Hugging Face Hub (or its local cache). Models that "
             "are not ViTs (Swin, ConvNeXt) are refused with the reason; DINOv3, EVA-02 and BEiT are listed too.")
    if name is None:
        st.info("Choose a timm model in the sidebar, or another model.")
        st.stop()
    return ModelChoice(name, None)


def _checkpoint(choice: str) -> ModelChoice:
    sb = st.sidebar
    ckpt = None
    if choice == UPLOAD:
        ckpt = sb.file_uploader("Checkpoint file", type=[s.lstrip(".") for s in CHECKPOINT_SUFFIXES],
                                key="ckpt_upload", help="Weights of a timm ViT. Pickles that would run code are "
                                "refused. Files over the upload limit can be offered by the server's operator.")
        sb.caption(_upload_limits())
    arch_text = sb.text_input("Architecture (timm name)", key="arch", placeholder="e.g. vit_small_patch16_224",
                              help="The timm architecture the weights belong to; optional where a .safetensors file "
                                   "names it in its metadata.")
    try:
        arch = check_arch(arch_text) if arch_text.strip() else None
    except VitvizError as exc:
        fail(exc)
    if choice != UPLOAD:
        return ModelChoice(str(checkpoint_dir() / choice.removeprefix(DIR_PREFIX)), arch)
    if ckpt is None:
        st.info("Upload a checkpoint file in the sidebar, or choose another model.")
        st.stop()
    data = ckpt.getvalue()
    return ModelChoice(f"upload:{digest(data)}", arch, upload=data, filename=ckpt.name)


def model_ui() -> ModelChoice:
    sb = st.sidebar
    sb.header("Model")
    trained = [TRAINED] if TRAINED_KEY in st.session_state else []
    choices = ["default", *HUB_MODELS, OTHER_HUB, *(DIR_PREFIX + f for f in checkpoint_files()), UPLOAD, *trained]
    keep("model", lambda v: v in choices, "default")
    choice = sb.selectbox("Model", choices, key="model", format_func=model_label,
                          help="The embedded DINOv2 ViT-S/14 works offline. Hub models need the Hugging Face Hub or "
                               "its local cache. Checkpoints: .safetensors or plain-tensor .pth/.pt/.bin files, or "
                               "folders saved by Hugging Face transformers. Families read: ViT, DeiT, DINOv2, "
                               "DINOv3 and EVA-02 (rotary positions), BEiT (relative positions), CLIP/SigLIP image "
                               "towers; a method that has no rule for a family says so (docs/families.md: the "
                               "table of families and methods).")
    if choice in HUB_MODELS:
        return ModelChoice(choice, None)
    if choice == OTHER_HUB:
        return _hub_other()
    if choice == UPLOAD or choice.startswith(DIR_PREFIX):
        return _checkpoint(choice)
    if choice == TRAINED:  # the session's own checkpoint, read as an uploaded one
        name, data = st.session_state[TRAINED_KEY]
        return ModelChoice(f"upload:{digest(data)}", None, upload=data, filename=name)
    return ModelChoice(*app_model())


def _snap(value: int, *, step: int, lo: int, hi: int) -> int:
    return min(max(round(value / step) * step, lo), hi)


def _device_ui() -> tuple[str, str]:
    """Device and precision; on a CPU-only machine there is nothing to choose, so only the caption is shown."""
    sb = st.sidebar
    devices = ["auto", *available_devices()]
    if devices == ["auto", "cpu"]:
        sb.caption("Running on **cpu** (float32).")
        return "auto", "auto"
    keep("device", lambda v: v in devices, "auto")
    device = sb.selectbox("Device", devices, key="device", help="auto: CUDA, else MPS, else CPU.")
    try:
        dev = pick_device(device)
    except VitvizError as exc:
        fail(exc)
    precisions = ["auto", "fp32"] if dev.type == "cpu" else ["auto", "fp32", "fp16", "bf16"]
    keep("precision", lambda v: v in precisions, "auto")
    precision = sb.selectbox("Precision", precisions, key="precision", help="Half precision only on a GPU.")
    sb.caption(f"Running on **{dev.type}** ({str(pick_dtype(dev, precision)).removeprefix('torch.')}).")
    return str(dev), precision


def _small_native(source: ModelSource) -> int | None:
    """The image size a classifier checkpoint that names its classes (one trained or probed here) was trained at,
    when it is below the sizes offered (IMG_MIN); else None. Its predictions hold at the scale it learned."""
    size = source.kwargs.get("img_size") if source.kind == "file" and source.label_names else None
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    return size if isinstance(size, int) and size < IMG_MIN else None


def input_ui(source: ModelSource, model_id: tuple) -> InputChoice:
    """Patch size, image size (only sizes whose analysis fits the server's memory budget), fit, device."""
    sb = st.sidebar
    native = source.native_patch_size
    lo_p, hi_p = patch_size_range(native)
    if st.session_state.get("_native_for") != model_id:  # a new model starts at its own patch size
        st.session_state["_native_for"] = model_id
        st.session_state["patch_size"] = native
    keep("patch_size", lambda v: lo_p <= v <= hi_p, native)
    patch = sb.slider("Patch size (px)", lo_p, hi_p, key="patch_size",
                      help=f"The model was trained with {native} px patches; other sizes resize the patch embedding "
                           "(FlexiViT PI-resize).")
    depth, heads, prefix, dim = source.layout
    fits = max_square_size(depth=depth, heads=heads, patch_size=patch, num_prefix_tokens=prefix, embed_dim=dim)
    small = _small_native(source)  # a tiny classifier trained here (32 px digits) is analysed at its own size
    if small and st.session_state.get("_small_for") != model_id:
        st.session_state["_small_for"], st.session_state["img_size"] = model_id, small
    lo_s, hi_s = -(-IMG_MIN // patch) * patch, max(min(IMG_MAX, fits) // patch * patch, patch)
    lo_s = min(lo_s, small) if small else lo_s
    lo_s = min(lo_s, hi_s)
    st.session_state["img_size"] = _snap(st.session_state["img_size"], step=patch, lo=lo_s, hi=hi_s)
    img_size = sb.slider("Image size (px)", lo_s, hi_s, step=patch, key="img_size", disabled=lo_s == hi_s,
                         help="Side of the square model input for a centre crop; the token budget for the whole "
                              "image." + (" Larger sizes need more memory than this server allows at this patch "
                                          "size." if hi_s < IMG_MAX // patch * patch else ""))
    fit = sb.radio("Fit", FITS, key="fit", horizontal=True,
                   format_func={"crop": "centre crop (timm eval)", "whole": "whole image"}.get,
                   help="Centre crop reproduces timm's eval preprocessing; whole image keeps everything, aspect ratio "
                        "kept within one patch, at about the same number of patches.")
    device, precision = _device_ui()
    return InputChoice(patch, img_size, fit, device, precision)


def display_ui() -> DisplayChoice:
    """How every map is drawn over the image: the overlay's opacity and its colour scale."""
    sb = st.sidebar
    sb.header("Display")
    opacity = sb.slider("Overlay opacity", 0.0, 1.0, step=0.05, key="opacity")
    keep("colorscale", lambda v: v in COLORSCALES, COLORSCALES[0])
    colorscale = sb.selectbox("Colour scale", COLORSCALES, key="colorscale",
                              format_func=lambda name: COLORSCALE_LABELS.get(name, name),
                              help="Every scale grows brighter with the value: dark is low, bright is high.")
    return DisplayChoice(opacity, colorscale)

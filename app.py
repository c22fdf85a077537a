"""vitviz app: how a timm Vision Transformer reads an image.

Run with ``streamlit run app.py``. A flat script in the manner of Streamlit's own examples: sidebar controls, one
image, one cached forward pass, then views that are cheap arithmetic on the captured attention (vitviz.analysis)
drawn by vitviz.figures. Every control is keyed and kept across reruns.

Environment:
    VITVIZ_CHECKPOINT_DIR  a folder of checkpoint files offered as models (operator-provided, never a user path)
    VITVIZ_APP_MODEL       replaces the embedded default model (a checkpoint path or timm name; used by the tests)
    VITVIZ_APP_ARCH        its timm architecture, where the checkpoint does not name it
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import streamlit as st

from vitviz import analysis as va
from vitviz import figures as vf
from vitviz.device import available_devices, pick_device, pick_dtype
from vitviz.errors import ParameterError
from vitviz.image import MAX_UPLOAD_BYTES, load_image
from vitviz.models import (
    CHECKPOINT_SUFFIXES,
    build_model,
    check_arch,
    describe_model,
    hub_cached,
    list_pretrained_vits,
    load_source,
    patch_size_range,
)

ASSETS = Path(__file__).parent / "assets"
IMAGE_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]
HUB_MODELS = [
    "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "deit_small_patch16_224",
    "vit_small_patch14_dinov2.lvd142m",
    "vit_small_patch14_reg4_dinov2.lvd142m",
]
UPLOAD = "upload"
OTHER_HUB = "hub:other"
DIR_PREFIX = "dir:"
COLORSCALES = ["Inferno", "Viridis", "Magma", "Plasma", "Turbo", "Jet", "Greys"]
IMG_MIN, IMG_MAX = 112, 518
ALL_HEADS = "all heads (fused)"
UPLOAD_DIR = Path(tempfile.gettempdir()) / "vitviz-uploads"
CHECKPOINT_DIR = os.environ.get("VITVIZ_CHECKPOINT_DIR", "")
APP_MODEL = os.environ.get("VITVIZ_APP_MODEL", "default")
APP_ARCH = os.environ.get("VITVIZ_APP_ARCH") or None


# ------------------------------------------------------------------------------------------------------ cached work


@st.cache_resource(max_entries=3, show_spinner="Loading model weights (the first run converts the default model)...")
def load_weights(name: str, arch: str | None):
    """(ModelSource, state dict) at the model's native sizes; shared by all sessions, never mutated."""
    return load_source(name, arch=arch)


@st.cache_resource(max_entries=4, show_spinner="Building the model...")
def get_model(name: str, arch: str | None, patch_size: int, input_size: tuple[int, int], device: str, precision: str):
    """The built model and its ModelInfo. Capture puts no state on the model, so sessions can share it."""
    source, state = load_weights(name, arch)
    dev = pick_device(device)
    model = build_model(source, state, patch_size=patch_size, img_size=input_size, device=dev,
                        dtype=pick_dtype(dev, precision))
    return model, describe_model(model, source=source)


@st.cache_resource(max_entries=4, show_spinner=False)
def open_image(digest: str, _data: bytes, name: str):
    """The decoded image (a read-only LoadedImage), keyed by the bytes' sha256."""
    return load_image(_data, name=name)


@st.cache_resource(max_entries=4, show_spinner="Running the model...")
def run_analysis(digest: str, model_key: tuple, fit: str, _image) -> tuple[va.Analysis, str | None]:
    """One forward pass per image and model, and a notice if the GPU ran out of memory and the CPU did it instead
    (cached under the asked-for key, so a control change never retries the GPU). A resource, not data: the Analysis
    is immutable (read-only arrays), so sessions share it instead of unpickling the L x H x T x T attention."""
    name, arch, patch, input_size, device, precision = model_key

    def load(dev: str):
        return get_model(name, arch, patch, input_size, dev, precision if dev == device else "auto")

    results, notice = va.analyze_with_fallback(load, [_image], device=device, fit=fit)
    return results[0], notice


@st.cache_data(max_entries=16, show_spinner=False)
def rollout_maps(digest: str, model_key: tuple, fit: str, head: str | int, discard: float, _analysis) -> np.ndarray:
    """(L, L, gh, gw): rollout over every layer range, [a, b] = layers a..b."""
    return va.rollout_table(_analysis.attention, info=_analysis.info, head_fusion=head, discard_ratio=discard)


@st.cache_data(max_entries=16, show_spinner=False)
def raw_maps(digest: str, model_key: tuple, fit: str, head: str | int, _analysis) -> np.ndarray:
    """(L, gh, gw): each layer's own CLS attention."""
    return va.raw_attention_maps(_analysis.attention, info=_analysis.info, head_fusion=head)


@st.cache_data(max_entries=16, show_spinner=False)
def query_maps(digest: str, model_key: tuple, fit: str, query: int | None, _analysis) -> np.ndarray:
    """(L, H, gh, gw): where one query token (None: CLS) attends, per layer and head."""
    info = _analysis.info
    return np.stack([va.query_attention_maps(_analysis.attention, info=info, layer=layer, query=query)
                     for layer in range(info.depth)])


@st.cache_data(max_entries=8, show_spinner=False)
def distances(digest: str, model_key: tuple, fit: str, _analysis) -> np.ndarray:
    return va.attention_distance(_analysis.attention, info=_analysis.info)


# ---------------------------------------------------------------------------------------------------------- helpers


def fail(exc: Exception) -> None:
    """A user-caused error: its message, no traceback, and nothing further on this run."""
    st.error(str(exc))
    st.stop()


def checkpoint_files() -> list[str]:
    folder = Path(CHECKPOINT_DIR) if CHECKPOINT_DIR else None
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES)


def model_label(choice: str) -> str:
    if choice == "default":
        return "Embedded DINOv2 ViT-S/14 (offline)" if APP_MODEL == "default" else f"{Path(APP_MODEL).name} (app)"
    if choice == UPLOAD:
        return "Upload a checkpoint..."
    if choice == OTHER_HUB:
        return "Another timm ViT from the Hub..."
    if choice.startswith(DIR_PREFIX):
        return f"Checkpoint: {choice.removeprefix(DIR_PREFIX)}"
    return f"{choice} ({'cached' if hub_cached(choice) else 'Hub, needs internet'})"


def save_checkpoint(upload) -> str:
    """Write an uploaded checkpoint under a fixed, content-derived name; the user's file name only gives the suffix."""
    suffix = Path(upload.name).suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ParameterError(f"checkpoint files must end in {', '.join(CHECKPOINT_SUFFIXES)}")
    data = upload.getvalue()
    path = UPLOAD_DIR / f"checkpoint-{hashlib.sha256(data).hexdigest()[:20]}{suffix}"
    if path.exists():
        return str(path)
    try:  # a private temp file, then an atomic rename: two sessions uploading the same file cannot collide
        UPLOAD_DIR.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=UPLOAD_DIR, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise ParameterError(f"could not store the uploaded checkpoint on the server ({exc.strerror or exc})") from exc
    return str(path)


def keep(key: str, ok, default) -> None:
    """Initialise a widget's state once, and reset it when it no longer fits the current model or image."""
    if key not in st.session_state or not ok(st.session_state[key]):
        st.session_state[key] = default


def snap(value: int, *, step: int, lo: int, hi: int) -> int:
    return min(max(round(value / step) * step, lo), hi)


def clicked_patch(points: list[dict], *, grid: tuple[int, int], patch_size: int, mosaic: bool = False) -> int | None:
    """The patch of the first clicked point. In the browser a click selects one of the figure's click targets, whose
    ``customdata[0]`` is the patch index (a typed-array row arrives as ``{"0": index, "1": row, ...}``); otherwise
    the patch under the point's (x, y) (plot coordinates are image pixels, or mosaic cells)."""
    gh, gw = grid
    for pt in points:
        custom = pt.get("customdata") or [None]
        idx = custom.get("0") if isinstance(custom, dict) else custom[0] if isinstance(custom, list) else None
        if isinstance(idx, (int, float)) and float(idx).is_integer() and 0 <= idx < gh * gw:
            return int(idx)
        x, y = pt.get("x"), pt.get("y")
        if not isinstance(x, (int, float)) or not isinstance(y, (int, float)):
            continue
        if mosaic:
            idx = vf.mosaic_point_to_patch(x, y, grid=grid)
        else:
            r, c = int(y // patch_size), int(x // patch_size)
            idx = r * gw + c if 0 <= r < gh and 0 <= c < gw else None
        if idx is not None:
            return idx
    return None


def on_click(chart_key: str, *, mosaic: bool = False) -> None:
    """Chart selection callback: runs before the rerun, so it may set the query patch input."""
    geom = st.session_state.get("_geometry")
    event = st.session_state.get(chart_key)
    if not geom or not event:
        return
    idx = clicked_patch(event["selection"]["points"], grid=geom["grid"], patch_size=geom["patch_size"], mosaic=mosaic)
    if idx is not None:
        st.session_state["query_patch"] = idx


def chart(fig, key: str, *, clickable: bool = True, mosaic: bool = False) -> None:
    if clickable:
        # Plotly keeps a clicked point selected, and a click on a selected point unselects it (an empty selection).
        # The figure names the query patch, so a new query gives a new element with nothing selected: a click on a
        # patch clicked before selects it afresh. Selection events only fire on a change: an old one never re-applies.
        fig.update_layout(selectionrevision=f"query {st.session_state.get('query_patch')}")
        st.plotly_chart(fig, key=key, on_select=functools.partial(on_click, key, mosaic=mosaic),
                        selection_mode="points")
    else:
        st.plotly_chart(fig, key=key)
    st.download_button("Figure as HTML", data=functools.partial(vf.figure_html, fig), file_name=f"{key}.html",
                       mime="text/html", key=f"dl_{key}", on_click="ignore")


def npz_bytes(res: va.Analysis, heat: np.ndarray, settings: dict) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **va.export_arrays(res, heat, settings=settings))  # the CLI's .npz format
    return buf.getvalue()


def token_text(info) -> str:
    cls = int(info.has_class_token)
    dist = info.num_prefix_tokens - cls - info.num_reg_tokens
    parts = [f"{cls} CLS"] + [f"{n} {what}" for n, what in ((info.num_reg_tokens, "registers"),
                                                             (dist, "distillation")) if n > 0]
    prefix = f"{info.num_prefix_tokens} prefix ({', '.join(parts)})"
    return f"{info.num_tokens} tokens = {info.num_patches} patches + {prefix}"


# ------------------------------------------------------------------------------------------------------------- page

st.set_page_config(page_title="vitviz", page_icon=":eye:", layout="wide")
st.title("vitviz")
st.write("How a Vision Transformer reads an image: its patch grid, what its position embeddings learned, "
         "and where the CLS token's attention flows layer by layer.")

d = va.DEFAULTS
PERSISTENT = ["example", "model", "arch", "patch_size", "img_size", "fit", "device", "precision", "layers", "view",
              "head", "head_fusion", "discard_ratio", "opacity", "colorscale", "query_patch", "heads_layer",
              "heads_source", "query_layer", "hub_name"]
INITIAL = dict(model="default", arch=APP_ARCH or "", device="auto", precision="auto", img_size=d.img_size, fit=d.fit,
               view="rollout", head=ALL_HEADS, head_fusion=d.head_fusion, discard_ratio=d.discard_ratio, opacity=0.6,
               colorscale="Inferno", heads_source="CLS token")
for key in PERSISTENT:  # keep values of widgets a run does not draw (the architecture box, while a hub model is on)
    if key in st.session_state:
        st.session_state[key] = st.session_state[key]
for key, value in INITIAL.items():
    st.session_state.setdefault(key, value)

# ---- sidebar: image (first, so a model that fails to load never drops the upload)
sb = st.sidebar
sb.header("Image")
upload = sb.file_uploader("Upload an image", type=IMAGE_TYPES, key="upload",
                          help=f"JPEG, PNG, WebP, BMP, GIF or TIFF, up to {MAX_UPLOAD_BYTES // 2**20} MB.")
examples = sorted(p.name for p in ASSETS.glob("*.jpg"))
example = sb.selectbox("...or an example", examples, key="example", index=None, placeholder="Choose an example",
                       help="Public-domain photos from scikit-image (see assets/README.md). An upload takes "
                            "precedence.")

# ---- sidebar: model
sb.header("Model")
choices = ["default", *HUB_MODELS, OTHER_HUB, *(DIR_PREFIX + f for f in checkpoint_files()), UPLOAD]
keep("model", lambda v: v in choices, "default")
choice = sb.selectbox("Model", choices, key="model", format_func=model_label,
                      help="The embedded DINOv2 ViT-S/14 works offline. Hub models need the Hugging Face Hub or its "
                           "local cache. Checkpoints: .safetensors or plain-tensor .pth/.pt/.bin files.")
name, arch = APP_MODEL, APP_ARCH
if choice in HUB_MODELS:
    name, arch = choice, None
elif choice == OTHER_HUB:  # a choice from timm's registry, never free text
    hub_name = sb.selectbox("timm model", list_pretrained_vits(), key="hub_name", index=None,
                            placeholder="Type to search, e.g. deit_base",
                            format_func=lambda n: f"{n} (cached)" if hub_cached(n) else n,
                            help="Any pretrained timm ViT; its weights come from the Hugging Face Hub (or its local "
                                 "cache). Models that are not plain ViTs are refused with the reason.")
    if hub_name is None:
        st.info("Choose a timm model in the sidebar, or another model.")
        st.stop()
    name, arch = hub_name, None
elif choice == UPLOAD or choice.startswith(DIR_PREFIX):
    ckpt = None
    if choice == UPLOAD:
        ckpt = sb.file_uploader("Checkpoint file", type=[s.lstrip(".") for s in CHECKPOINT_SUFFIXES],
                                key="ckpt_upload", help="Weights of a timm ViT. Pickles that would run code are "
                                "refused. For files over the upload limit, ask the operator to put them in "
                                "VITVIZ_CHECKPOINT_DIR.")
    arch_text = sb.text_input("Architecture (timm name)", key="arch", placeholder="e.g. vit_small_patch16_224",
                              help="The timm architecture the weights belong to; optional where a .safetensors file "
                                   "names it in its metadata.")
    try:
        arch = check_arch(arch_text) if arch_text.strip() else None
        if choice == UPLOAD:
            if ckpt is None:
                st.info("Upload a checkpoint file in the sidebar, or choose another model.")
                st.stop()
            name = save_checkpoint(ckpt)
        else:
            name = str(Path(CHECKPOINT_DIR) / choice.removeprefix(DIR_PREFIX))
    except ValueError as exc:
        fail(exc)

try:
    _source, _state = load_weights(name, arch)
except ValueError as exc:
    fail(exc)
native = int(_state["patch_embed.proj.weight"].shape[-1])

lo_p, hi_p = patch_size_range(native)
if st.session_state.get("_native_for") != (name, arch):  # a new model starts at its own patch size
    st.session_state["_native_for"] = (name, arch)
    st.session_state["patch_size"] = native
keep("patch_size", lambda v: lo_p <= v <= hi_p, native)
patch = sb.slider("Patch size (px)", lo_p, hi_p, key="patch_size",
                  help=f"The model was trained with {native} px patches; other sizes resize the patch embedding "
                       "(FlexiViT PI-resize).")
lo_s, hi_s = -(-IMG_MIN // patch) * patch, IMG_MAX // patch * patch
st.session_state["img_size"] = snap(st.session_state["img_size"], step=patch, lo=lo_s, hi=hi_s)
img_size = sb.slider("Image size (px)", lo_s, hi_s, step=patch, key="img_size",
                     help="Side of the square model input for a centre crop; the token budget for the whole image.")
fit = sb.radio("Fit", ["crop", "whole"], key="fit", horizontal=True,
               format_func={"crop": "centre crop (timm eval)", "whole": "whole image"}.get,
               help="Centre crop reproduces timm's eval preprocessing; whole image keeps everything, aspect ratio "
                    "about kept, at about the same number of patches.")
devices = ["auto", *available_devices()]
keep("device", lambda v: v in devices, "auto")
device = sb.selectbox("Device", devices, key="device", help="auto: CUDA, else MPS, else CPU.")
try:
    dev = pick_device(device)
except ValueError as exc:
    fail(exc)
precisions = ["auto", "fp32"] if dev.type == "cpu" else ["auto", "fp32", "fp16", "bf16"]
keep("precision", lambda v: v in precisions, "auto")
precision = sb.selectbox("Precision", precisions, key="precision", help="Half precision only on a GPU.")
sb.caption(f"Running on **{dev.type}** ({str(pick_dtype(dev, precision)).removeprefix('torch.')}).")

if upload is not None:
    data, image_name = upload.getvalue(), upload.name
elif example is not None:
    data, image_name = (ASSETS / example).read_bytes(), example
else:
    st.info("Upload an image or choose an example in the sidebar to begin.")
    st.stop()

digest = hashlib.sha256(data).hexdigest()
try:
    loaded = open_image(digest, data, image_name)
    input_size = va.input_size_for(loaded.image, img_size=img_size, patch_size=patch, fit=fit)
    model_key = (name, arch, patch, input_size, device, precision)
    res, notice = run_analysis(digest, model_key, fit, loaded)
except ValueError as exc:
    fail(exc)
info = res.info
if notice:  # the GPU was full (other sessions, a big grid): this analysis ran on the CPU
    st.warning(notice)
sb.caption(f"Model input: **{input_size[1]} x {input_size[0]} px** = {info.grid[1]} x {info.grid[0]} patches "
           f"of {patch} px.")

# ---- sidebar: views
sb.header("Attention")
depth, heads, n = info.depth, info.num_heads, info.num_patches
start0, end0 = d.layer_range(depth)
keep("layers", lambda v: isinstance(v, (tuple, list)) and 0 <= v[0] <= v[1] < depth, (start0, end0))
if depth > 1:
    start, end = sb.slider("Layers (start..end)", 0, depth - 1, key="layers",
                           help="Rollout multiplies the attention of layers start..end; the views open at the end "
                                "layer and scrub through the others in the browser.")
else:  # a one-layer model: nothing to choose (a slider needs two ends)
    start, end = 0, 0
    sb.caption("Layers: the model has a single layer.")
view = sb.radio("Rollout view", ["rollout", "raw"], key="view", format_func={
    "rollout": "rollout from the start layer", "raw": "one layer's raw CLS attention"}.get,
    help="Rollout follows attention through the residual stream; raw shows each layer on its own.")
head_options = [ALL_HEADS, *range(heads)]
keep("head", lambda v: v in head_options, ALL_HEADS)
head_choice = sb.selectbox("Head", head_options, key="head", format_func=lambda h: h if h == ALL_HEADS else f"head {h}",
                           help="Fuse all heads, or follow one head through every layer.")
fusion = sb.selectbox("Head fusion", ["mean", "max", "min"], key="head_fusion", disabled=head_choice != ALL_HEADS,
                      help="How the heads of a layer are combined.")
discard = sb.slider("Discard ratio", 0.0, 0.99, step=0.01, key="discard_ratio", disabled=view == "raw",
                    help="Zero this share of the weakest attention entries per layer before rollout (not the CLS "
                         "column). Rollout only: the raw view shows attention as it is.")
opacity = sb.slider("Overlay opacity", 0.0, 1.0, step=0.05, key="opacity")
colorscale = sb.selectbox("Colour scale", COLORSCALES, key="colorscale")
head = fusion if head_choice == ALL_HEADS else int(head_choice)

# ---- status
st.session_state["_geometry"] = dict(grid=info.grid, patch_size=info.patch_size)
keep("query_patch", lambda v: isinstance(v, int) and 0 <= v < n, (info.grid[0] // 2) * info.grid[1] + info.grid[1] // 2)
notes = f" · notes: {'; '.join(res.notes)}" if res.notes else ""
st.caption(
    f"**{info.name}** ({info.arch}) · {res.device}, {res.dtype} · "
    f"grid {info.grid[0]}x{info.grid[1]} · {token_text(info)} · forward pass {res.seconds * 1000:.0f} ms · "
    f"{res.fit_description}{notes}"
)
query = st.number_input("Query patch (or click a patch in a figure)", 0, n - 1, key="query_patch",
                        help="Row-major patch index, as timm flattens the grid.")

try:
    if view == "rollout":
        table = rollout_maps(digest, model_key, fit, head, discard, res)
        maps = table[start, start:]  # rollout start..b for every end layer b
        labels = [f"layers {start}-{b}" for b in range(start, depth)]
        active = end - start
    else:
        maps = raw_maps(digest, model_key, fit, head, res)
        labels = [f"layer {b}" for b in range(depth)]
        active = end
    heat = maps[active]
    qmaps = query_maps(digest, model_key, fit, int(query), res)
    cls_maps = query_maps(digest, model_key, fit, None, res)
    dist = distances(digest, model_key, fit, res)
except ValueError as exc:
    fail(exc)

head_text = "all heads" if head_choice == ALL_HEADS else f"head {head}"
what = f"rollout over layers {start}-{end}" if view == "rollout" else f"raw CLS attention of layer {end}"
settings = {**dataclasses.asdict(d), "model": info.name, "arch": info.arch, "patch_size": info.patch_size,
            "img_size": list(info.img_size), "fit": fit, "start_layer": start, "end_layer": end,
            "view": view, "head": head_choice,
            "head_fusion": fusion, "discard_ratio": discard, "device": res.device, "precision": precision}

sb.header("Downloads")
c1, c2 = sb.columns(2)
c1.download_button("Overlay PNG", data=functools.partial(vf.overlay_png, res.pixels, heat, patch_size=info.patch_size,
                                                         opacity=opacity, colorscale=colorscale),
                   file_name="overlay.png", mime="image/png", key="dl_png", on_click="ignore")
c2.download_button("Arrays (.npz)", data=functools.partial(npz_bytes, res, heat, settings), file_name="vitviz.npz",
                   mime="application/octet-stream", key="dl_npz", on_click="ignore")

# on_change="rerun": only the open tab is computed and sent (tab.open), so a control change builds one view's figures
tabs = st.tabs(["Patch grid", "Position embeddings", "Attention rollout", "Heads", "Query patch",
                "Attention distance"], key="tab", on_change="rerun")
with tabs[0]:
    if tabs[0].open:  # only the open tab is built
        st.markdown(f"N = H·W / P² = {info.img_size[0]}·{info.img_size[1]} / {info.patch_size}² = **{n} patches**; "
                    f"the transformer reads {token_text(info)}. Click a patch to make it the query.")
        chart(vf.patch_grid_figure(res.pixels, patch_size=info.patch_size, grid=info.grid, highlight=query), "fig_grid")

with tabs[1]:
    if tabs[1].open:  # only the open tab is built
        st.markdown("Cosine similarity of the learned position embeddings. Nearby patches should look alike: the model "
                    "learned the 2-D layout. Click a tile (or set the query patch) to see that patch's map.")
        left, right = st.columns(2)
        with left:
            if n <= vf.MOSAIC_MAX_TOKENS:
                chart(vf.similarity_mosaic_figure(res.pos_sim, grid=info.grid, highlight=query), "fig_mosaic",
                      mosaic=True)
            else:
                st.info(f"The mosaic of {n} patches is too large to draw (at most {vf.MOSAIC_MAX_TOKENS}); "
                        "pick patches one at a time.")
        with right:
            chart(vf.similarity_map_figure(res.pos_sim, grid=info.grid, index=query, patch_size=info.patch_size,
                                           pixels=res.pixels, colorscale="Viridis", opacity=opacity), "fig_simmap")

with tabs[2]:
    if tabs[2].open:  # only the open tab is built
        st.markdown(f"CLS attention, {what}, {head_text}" + (f" ({fusion})" if head_choice == ALL_HEADS else "")
                    + (f", discard {discard:.2f}" if discard and view == "rollout" else "")
                    + ". Use the slider under the figure to scrub "
                    "through the layers.")
        chart(vf.layer_scrub_figure(res.pixels, maps, patch_size=info.patch_size, labels=labels, active=active,
                                    opacity=opacity, colorscale=colorscale), "fig_rollout")

with tabs[3]:
    if tabs[3].open:  # only the open tab is built
        keep("heads_layer", lambda v: isinstance(v, int) and 0 <= v < depth, end)
        hl, hs = st.columns(2)
        layer = hl.selectbox("Layer", list(range(depth)), key="heads_layer")
        source = hs.radio("Attention of", ["CLS token", "query patch"], key="heads_source", horizontal=True)
        grid_maps = cls_maps[layer] if source == "CLS token" else qmaps[layer]
        st.markdown(f"Layer {layer}: where {'the CLS token' if source == 'CLS token' else f'patch {query}'} attends, "
                    f"each of the {heads} heads.")
        chart(vf.head_grid_figure(grid_maps, patch_size=info.patch_size, pixels=res.pixels, colorscale=colorscale,
                                  opacity=opacity), "fig_heads")

with tabs[4]:
    if tabs[4].open:  # only the open tab is built
        keep("query_layer", lambda v: isinstance(v, int) and 0 <= v < depth, end)
        r, c = divmod(int(query), info.grid[1])
        st.markdown(f"Patch {query} (row {r}, col {c}): its attention, mean over heads, layer by layer.")
        chart(vf.layer_scrub_figure(res.pixels, qmaps.mean(axis=1), patch_size=info.patch_size,
                                    labels=[f"layer {b}" for b in range(depth)], active=end, opacity=opacity,
                                    colorscale=colorscale), "fig_query")
        qlayer = st.selectbox("Layer for the heads", list(range(depth)), key="query_layer")
        chart(vf.head_grid_figure(qmaps[qlayer], patch_size=info.patch_size, pixels=res.pixels, colorscale=colorscale,
                                  opacity=opacity), "fig_query_heads")

with tabs[5]:
    if tabs[5].open:  # only the open tab is built
        st.markdown("Mean distance, in input pixels, between each patch and the patches it attends to (ViT paper, "
                    "Fig. 7): low heads look locally, high heads globally.")
        chart(vf.attention_distance_figure(dist), "fig_distance", clickable=False)

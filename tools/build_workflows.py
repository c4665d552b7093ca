"""Build workflows/*.json (UI format) and workflows/api/*.json (API format) from one description per graph.

The descriptions below name nodes, their links and the widget values that differ from the node's default;
everything else (input order, widget order, default values, output names and types, titles) comes from a
running ComfyUI's /object_info with this pack installed, so the files are what ComfyUI's frontend (1.27)
would save for the same graph. The API twin is converted from the UI file by the same rules as the
frontend's Export (API), less the inputs that frontend extensions add to core nodes and the nodes do not
declare (PreviewAny's `preview`): the server ignores them, and /prompt clients should not have to.
Output is deterministic: same object_info and pyproject.toml, same bytes.

Every node carries its pack in `properties`, as ComfyUI-Manager and the frontend's missing-nodes dialog
read it: this pack's nodes `cnr_id` (the Registry id, [project].name), `aux_id` (GitHub owner/repo of
[project.urls].Repository) and `ver` ([project].version); ComfyUI's own nodes `cnr_id: comfy-core` and the
ComfyUI version the pack is tested with (the lower bound of [tool.comfy].requires-comfyui).

    python tools/build_workflows.py --server http://127.0.0.1:8188          # write the files
    python tools/build_workflows.py --server http://127.0.0.1:8188 --check  # exit 1 if they differ
    python tools/build_workflows.py --object-info object_info.json          # from a saved /object_info
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import urllib.request
import uuid
from pathlib import Path

try:
    from tomllib import loads as toml_loads
except ModuleNotFoundError:  # Python 3.10: tomlkit (it comes with comfy-cli, see requirements-test.txt)
    import tomlkit

    def toml_loads(text: str) -> dict:
        return tomlkit.parse(text).unwrap()

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
FRONTEND_VERSION = "1.27.10"  # the frontend whose save format these files follow (checked by loading them)
SLOT_HEIGHT, WIDGET_HEIGHT = 20, 24  # litegraph's slot and widget rows, for the default node sizes
NOTE_COLORS = {"color": "#432", "bgcolor": "#653"}  # the frontend's note colours


def _load_format():
    """cli/workflow_format.py of this repository (the pack is not importable under its folder name)."""
    spec = importlib.util.spec_from_file_location("longedit_workflow_format", REPO / "cli" / "workflow_format.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fmt = _load_format()

CORE_PACK = "comfy-core"  # what the frontend and ComfyUI-Manager call ComfyUI's built-in nodes


def pack_properties(pyproject: Path = REPO / "pyproject.toml") -> tuple[dict, dict]:
    """(this pack's node properties, ComfyUI core's) from pyproject.toml."""
    meta = toml_loads(pyproject.read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    repository = re.fullmatch(r"https://github\.com/([^/]+/[^/#?]+?)/?", project["urls"]["Repository"])
    tested = re.fullmatch(r">=\s*(\d+\.\d+\.\d+)", comfy["requires-comfyui"])
    if not repository or not tested:
        raise SystemExit("pyproject.toml: [project.urls].Repository must be https://github.com/OWNER/REPO and "
                         "[tool.comfy].requires-comfyui '>=X.Y.Z'")
    return ({"cnr_id": project["name"], "aux_id": repository.group(1), "ver": project["version"]},
            {"cnr_id": CORE_PACK, "ver": tested.group(1)})


PACK_PROPERTIES, CORE_PROPERTIES = pack_properties()


def node(id, type, pos, values=None, links=None, title=None, size=None, models=None):
    """A graph node: `links` maps an input name to (source node id, output index)."""
    return dict(id=id, type=type, pos=pos, values=values or {}, links=links or {}, title=title, size=size,
                models=models)


def note(id, pos, size, text, title=None):
    return dict(id=id, type="MarkdownNote", pos=pos, size=size, text=text, title=title)


SD21 = "v2-1_512-ema-pruned.safetensors"  # Stable Diffusion 2.1-base, the model AdaFlow uses
SAMPLE_VIDEO = "longedit_sample.mp4"  # what `python -m longedit run` writes into input/ when given no video
WAN_REPO = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
EDIT_PROMPT = "a watercolor painting, soft brush strokes, pastel colors"

CHECKPOINT_NOTE = (
    "**Checkpoint:** Stable Diffusion 2.1-base, `{ckpt}` (512 px, epsilon prediction) in "
    "`models/checkpoints`: the model AdaFlow uses. Other SD 1.x / 2.x checkpoints work; SDXL, SD3, Flux "
    "and Wan do not (the nodes say so).").format(ckpt=SD21)
RUNNER_NOTE = "From a shell: `python -m longedit run {command}` (see the pack's README, *Headless runner*)."


NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"  # AdaFlow's own negative prompt (its configs)


def edit_nodes(*, keyframes: bool, frame_cap: int, prefix: str) -> list[dict]:
    """The AdaFlow edit graph: with keyframes, selection + propagation (long videos); without, every frame
    is a keyframe (short clips)."""
    x = [480, 800, 1240, 1680, 2000, 2360]
    nodes = [
        node(1, "CheckpointLoaderSimple", [x[0], 0], {"ckpt_name": SD21}, size=[290, 98]),
        node(2, "LongEditLoadVideo", [x[0], 140], {"video": SAMPLE_VIDEO, "frame_cap": frame_cap, "width": 672,
                                                    "height": 384}, size=[290, 470]),
        node(3, "LongEditEncodeVideo", [x[1], 0], links={"video": (2, 0), "vae": (1, 2)}, size=[240, 46]),
        node(4, "CLIPTextEncode", [x[1], 100], {"text": ""}, {"clip": (1, 1)},
             title="Empty prompt (source)", size=[400, 120]),
        node(5, "CLIPTextEncode", [x[1], 270], {"text": EDIT_PROMPT}, {"clip": (1, 1)}, title="Edit prompt",
             size=[400, 160]),
        node(14, "CLIPTextEncode", [x[1], 470], {"text": NEGATIVE_PROMPT}, {"clip": (1, 1)},
             title="Negative prompt (AdaFlow's)", size=[400, 120]),
    ]
    if keyframes:
        nodes += [
            node(6, "LongEditAdaFlowKeyframeSelection", [x[2], 0], {"seed": 0, "control_after_generate": "fixed"},
                 {"model": (1, 0), "latent": (3, 0), "empty_prompt": (4, 0)}, size=[300, 306]),
            node(7, "PreviewImage", [x[2], 350], links={"images": (6, 1)}, title="Keyframe plan", size=[400, 300]),
            node(8, "PreviewAny", [x[2], 690], links={"source": (6, 2)}, title="Keyframe summary",
                 size=[400, 140]),
        ]
    nodes += [
        node(9, "LongEditAdaFlowInvert", [x[3], 0], {"steps": 50, "scheduler": "ddim_uniform"},
             {"model": (1, 0), "latent": (3, 0), "source_prompt": (4, 0)}, size=[280, 146]),
        node(10, "LongEditAdaFlowKeyframeEditing", [x[3], 200], {},
             {"model": (1, 0), "inversion": (9, 1), **({"keyframes": (6, 0)} if keyframes else {})},
             size=[280, 146]),
    ]
    model = (10, 0)
    if keyframes:
        # how the keyframe pass slims extended attention (its settings win over Keyframe Editing's kv_budget)
        nodes.append(node(15, "LongEditAdaFlowAttentionSlimming", [x[3], 390], {"policy": "aas"},
                          {"model": (10, 0)}, size=[280, 226]))
        nodes.append(node(11, "LongEditAdaFlowLatentPropagation", [x[3], 660], {},
                          {"model": (15, 0), "keyframes": (6, 0)}, size=[280, 46]))
        model = (11, 0)
    nodes += [
        node(12, "KSamplerAdvanced", [x[4], 0], {
            "add_noise": "disable", "noise_seed": 0, "control_after_generate": "fixed", "steps": 50, "cfg": 7.5,
            "sampler_name": "ddim", "scheduler": "ddim_uniform", "start_at_step": 0, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"},
             {"model": model, "positive": (5, 0), "negative": (14, 0), "latent_image": (9, 0)}, size=[310, 334]),
        node(13, "LongEditDecodeSaveVideo", [x[5], 0], {"filename_prefix": prefix, "crf": 19, "fps": 0},
             {"samples": (12, 0), "vae": (1, 2), "video": (2, 0)}, size=[400, 420]),
    ]
    return nodes


LONG_NOTE = f"""## AdaFlow: edit a long video

{CHECKPOINT_NOTE}

**Change first**
1. **Load Video (LongEdit)**: upload or pick your video. 672×384 is AdaFlow's size; set `frame_cap` to try a
   few hundred frames first.
2. **Edit prompt**: describe the edited video.
3. Queue, then look at **Keyframe plan** (one thumbnail per clip, ticks for keyframe candidates). A missed
   scene cut: raise `tau_mean` / `tau_region` in AdaFlow Keyframe Selection.

**Attention:** AdaFlow Attention Slimming sets how the keyframes attend to each other: `aas` (AdaFlow's
budget of `kv_budget` most similar keyframes), `isa` (sparse attention, faster with many clips), `full`.

**Keep in step:** AdaFlow Invert and KSampler (Advanced) use the same `steps` and `scheduler`; the sampler stays
`ddim` with `add_noise` disabled and `start_at_step` 0. Fewer steps (e.g. 25) halve the time.

The video is streamed: any length fits in RAM; the inversion is kept on disk in ComfyUI's temp folder
(the plan is printed in the log and shown by AdaFlow Keyframe Editing). The audio is copied into the output.

{RUNNER_NOTE.format(command='adaflow_long_video_edit --video my.mp4 --prompt "..."')}"""

SHORT_NOTE = f"""## AdaFlow: edit a short clip

{CHECKPOINT_NOTE}

Every frame is a keyframe: all frames attend to each other in one pass (extended attention), so keep clips
short: 48 frames at 672×384 take about 12 GiB of GPU memory for the keyframe pass. For longer videos use
`adaflow_long_video_edit` (keyframe selection and propagation).

**Change first**
1. **Load Video (LongEdit)**: upload or pick your clip; `frame_cap` is 48.
2. **Edit prompt**: describe the edited clip.

AdaFlow Invert and KSampler (Advanced) must use the same `steps` and `scheduler` (sampler `ddim`,
`add_noise` disabled).

{RUNNER_NOTE.format(command='adaflow_short_clip_edit --video my.mp4 --prompt "..."')}"""

PREVIEW_NOTE = f"""## AdaFlow: preview the keyframe plan

{CHECKPOINT_NOTE}

Runs only Adaptive Keyframe Selection, to check how a video splits into clips before spending GPU time on
the edit: **Keyframe plan** shows one thumbnail per clip above a timeline (white ticks: keyframe candidates),
**Keyframe summary** lists the clip ranges.

**Change first**
1. **Load Video (LongEdit)**: upload or pick your video (same size settings as the edit).
2. **AdaFlow Keyframe Selection**: `tau_mean` / `tau_region` higher = more, shorter clips; `max_clip_length`
   caps a clip. Use the same values in `adaflow_long_video_edit`.

{RUNNER_NOTE.format(command="adaflow_keyframe_preview --video my.mp4")}"""

WAN_NOTE = f"""## ISA sparse attention on Wan 2.1

**Models** (Comfy-Org's repackaged Wan 2.1 files):
- `models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors` (or the 14B one)
- `models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors`
- `models/vae/wan_2.1_vae.safetensors`

**ISA Sparse Attention** sits between the model loader and the sampler and replaces the model's
self-attention; it works with Wan 2.1 / 2.2 only.

**Change first**
1. **Prompt**: describe the video.
2. **ISA Sparse Attention**: `context` is `none` for plain text-to-video. For in-context editing models,
   whose token sequence is [generated | source video], choose `second half`. `alpha_f` = `alpha_s` = 1 is
   exact attention; lower values are faster.
3. **EmptyHunyuanLatentVideo**: size and `length` (frames, 4n+1).

`backend` auto uses the Triton kernels on CUDA and plain torch elsewhere (slow).

{RUNNER_NOTE.format(command='isa_wan_video --prompt "..."')}"""


def long_video() -> list[dict]:
    return [note(20, [0, 0], [440, 620], LONG_NOTE, "Read me")] + \
        edit_nodes(keyframes=True, frame_cap=0, prefix="LongEdit/adaflow_long")


def short_clip() -> list[dict]:
    return [note(20, [0, 0], [440, 520], SHORT_NOTE, "Read me")] + \
        edit_nodes(keyframes=False, frame_cap=48, prefix="LongEdit/adaflow_short")


def keyframe_preview() -> list[dict]:
    x = [480, 800, 1240]
    return [
        note(20, [0, 0], [440, 520], PREVIEW_NOTE, "Read me"),
        node(1, "CheckpointLoaderSimple", [x[0], 0], {"ckpt_name": SD21}, size=[290, 98]),
        node(2, "LongEditLoadVideo", [x[0], 140], {"video": SAMPLE_VIDEO, "width": 672, "height": 384},
             size=[290, 470]),
        node(3, "LongEditEncodeVideo", [x[1], 0], links={"video": (2, 0), "vae": (1, 2)}, size=[240, 46]),
        node(4, "CLIPTextEncode", [x[1], 100], {"text": ""}, {"clip": (1, 1)}, title="Empty prompt",
             size=[400, 120]),
        node(6, "LongEditAdaFlowKeyframeSelection", [x[1], 270], {"seed": 0, "control_after_generate": "fixed"},
             {"model": (1, 0), "latent": (3, 0), "empty_prompt": (4, 0)}, size=[300, 306]),
        node(7, "PreviewImage", [x[2], 0], links={"images": (6, 1)}, title="Keyframe plan", size=[480, 360]),
        node(8, "PreviewAny", [x[2], 400], links={"source": (6, 2)}, title="Keyframe summary", size=[480, 160]),
    ]


def isa_wan() -> list[dict]:
    x = [480, 800, 1240, 1580, 1900]
    return [
        note(20, [0, 0], [440, 560], WAN_NOTE, "Read me"),
        node(1, "UNETLoader", [x[0], 0], {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"},
             size=[290, 82], models=[("wan2.1_t2v_1.3B_fp16.safetensors", "diffusion_models")]),
        node(2, "CLIPLoader", [x[0], 130], {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                            "device": "default"},
             size=[290, 106], models=[("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders")]),
        node(3, "VAELoader", [x[0], 290], {"vae_name": "wan_2.1_vae.safetensors"}, size=[290, 58],
             models=[("wan_2.1_vae.safetensors", "vae")]),
        node(4, "LongEditIsaSparseAttention", [x[1], 0], {"context": "none"}, {"model": (1, 0)}, size=[300, 274]),
        node(5, "CLIPTextEncode", [x[1], 320], {"text": "a red fox running through a snowy forest, tracking shot"},
             {"clip": (2, 0)}, title="Prompt", size=[400, 150]),
        node(6, "CLIPTextEncode", [x[1], 510], {"text": "blurry, low quality, static, distorted"},
             {"clip": (2, 0)}, title="Negative prompt", size=[400, 120]),
        node(7, "EmptyHunyuanLatentVideo", [x[1], 670], {"width": 832, "height": 480, "length": 33,
                                                          "batch_size": 1}, size=[300, 130]),
        node(8, "KSampler", [x[2], 0], {"seed": 0, "control_after_generate": "fixed", "steps": 30, "cfg": 6.0,
                                        "sampler_name": "uni_pc", "scheduler": "simple", "denoise": 1.0},
             {"model": (4, 0), "positive": (5, 0), "negative": (6, 0), "latent_image": (7, 0)}, size=[300, 262]),
        node(9, "VAEDecode", [x[3], 0], links={"samples": (8, 0), "vae": (3, 0)}, size=[200, 46]),
        node(10, "LongEditSaveVideo", [x[3], 100], {"filename_prefix": "LongEdit/isa_wan", "fps": 16},
             {"images": (9, 0)}, size=[400, 420]),
    ]


LIVEDITOR_FILE = "liveditor_14b.safetensors"  # LIVEditor-14B (model hub: sst12345/liveditor) as safetensors
WAN_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
                "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")  # Wan's default negative prompt
LIVEDITOR_NOTE = f"""## LIVEditor: edit a video from a prompt (in-context, Wan 14B)

LIVEditor-14B, the editor of the ISA paper: the model sees [edited video | source video] as one sequence.

**Models**
- `models/diffusion_models/{LIVEDITOR_FILE}`: LIVEditor-14B (model hub `sst12345/liveditor`), loaded by
  **Load Diffusion Model** and read again by **LIVEditor** for its extra weights (gates, source embedding)
- `models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors`, `models/vae/wan_2.1_vae.safetensors`

**Change first**
1. **Load Video**: your video; 960x544 (16:9) as trained. Any length: longer than 81 frames is edited
   as overlapping clips of 81 frames (LIVEditor `clip_frames` 21 latent frames, `overlap` 5), blended at
   every step so no seam shows.
2. **Prompt**: the edit, e.g. "turn the car red".
3. **ISA Sparse Attention** (context `second half` = the source video) makes self-attention sparse;
   `alpha_f` = `alpha_s` = 1 is exact. It must come before LIVEditor.

Sampler settings are the authors': 32 steps, cfg 2.5, uni_pc, shift 6. **Pad Frames for Wan VAE** and
**Trim Frames to Video** keep the frame count (the Wan VAE keeps 4k+1 frames); Save Video copies the
source's audio.

{RUNNER_NOTE.format(command='liveditor_video_edit --video my.mp4 --prompt "..."')}"""


def liveditor() -> list[dict]:
    x = [480, 800, 1240, 1580, 1900]
    return [
        note(20, [0, 0], [440, 640], LIVEDITOR_NOTE, "Read me"),
        node(1, "UNETLoader", [x[0], 0], {"unet_name": LIVEDITOR_FILE, "weight_dtype": "default"},
             size=[290, 82], models=[(LIVEDITOR_FILE, "diffusion_models")]),
        node(2, "CLIPLoader", [x[0], 130], {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                            "device": "default"},
             size=[290, 106], models=[("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders")]),
        node(3, "VAELoader", [x[0], 290], {"vae_name": "wan_2.1_vae.safetensors"}, size=[290, 58],
             models=[("wan_2.1_vae.safetensors", "vae")]),
        node(5, "LongEditLoadVideo", [x[0], 390], {"video": SAMPLE_VIDEO, "width": 960, "height": 544,
                                                    "size_multiple": "16", "image_frame_cap": 2000},
             size=[290, 470]),
        node(4, "LongEditIsaSparseAttention", [x[1], 0], {"context": "second half"}, {"model": (1, 0)},
             size=[300, 274]),
        node(15, "ModelSamplingSD3", [x[1], 320], {"shift": 6.0}, {"model": (4, 0)}, size=[300, 58]),
        node(8, "CLIPTextEncode", [x[1], 420], {"text": "turn it into a watercolor painting, soft pastel colors"},
             {"clip": (2, 0)}, title="Prompt", size=[400, 150]),
        node(9, "CLIPTextEncode", [x[1], 610], {"text": WAN_NEGATIVE}, {"clip": (2, 0)}, title="Negative prompt",
             size=[400, 150]),
        node(6, "LongEditPadFramesForWan", [x[1], 800], links={"images": (5, 1)}, size=[300, 66]),
        node(7, "VAEEncode", [x[1], 910], links={"pixels": (6, 0), "vae": (3, 0)}, size=[200, 46]),
        node(10, "LongEditLiveditor", [x[2], 0], {"liveditor_name": LIVEDITOR_FILE},
             {"model": (15, 0), "positive": (8, 0), "negative": (9, 0), "source": (7, 0)}, size=[320, 190]),
        node(11, "KSampler", [x[2], 240], {"seed": 0, "control_after_generate": "fixed", "steps": 32, "cfg": 2.5,
                                          "sampler_name": "uni_pc", "scheduler": "simple", "denoise": 1.0},
             {"model": (10, 0), "positive": (10, 1), "negative": (10, 2), "latent_image": (10, 3)},
             size=[300, 262]),
        node(12, "VAEDecode", [x[3], 0], links={"samples": (11, 0), "vae": (3, 0)}, size=[200, 46]),
        node(13, "LongEditTrimFramesToVideo", [x[3], 100], links={"images": (12, 0), "video": (5, 0)},
             size=[250, 66]),
        node(14, "LongEditSaveVideo", [x[4], 0], {"filename_prefix": "LongEdit/liveditor"},
             {"images": (13, 0), "video": (5, 0)}, size=[400, 420]),
    ]


GRAPHS = {
    "adaflow_long_video_edit": long_video,
    "adaflow_short_clip_edit": short_clip,
    "adaflow_keyframe_preview": keyframe_preview,
    "isa_wan_video": isa_wan,
    "liveditor_video_edit": liveditor,
}


def default_size(info: dict, outputs: int) -> list[int]:
    """litegraph's computed size: one row per slot, one per widget (the width is the frontend's minimum)."""
    widgets = len(fmt.widget_names(info))
    rows = max(len(fmt.socket_inputs(info)), outputs) * SLOT_HEIGHT + 6
    return [270, rows + (widgets * WIDGET_HEIGHT + 8 if widgets else 0)]


def widget_values(spec: dict, info: dict) -> list:
    """Values in the frontend's widget order: given values, else the input's default."""
    specs = {name: (kind, options) for name, kind, options, _ in fmt.input_specs(info)}
    unknown = set(spec["values"]) - set(fmt.widget_names(info))
    if unknown:
        raise SystemExit(f"{spec['type']} (node {spec['id']}) has no widget {sorted(unknown)}")
    values = []
    for name in fmt.widget_names(info):
        if name in spec["values"]:
            values.append(spec["values"][name])
        elif name == fmt.CONTROL_WIDGET:
            values.append("fixed")  # shared workflows should reproduce; the frontend's default is randomize
        elif name == fmt.UPLOAD_WIDGET:
            values.append("image")  # the upload button's value, whatever it uploads
        elif "default" in specs[name][1]:
            values.append(specs[name][1]["default"])
        else:
            raise SystemExit(f"{spec['type']} (node {spec['id']}): give a value for '{name}' (no default)")
    return values


def build_links(specs: list[dict], object_info: dict) -> list[list]:
    """[id, origin, origin_slot, target, target_slot, type] in the order the inputs are listed."""
    links = []
    for spec in specs:
        if spec["type"] == "MarkdownNote":
            continue
        sockets = [name for name, _, _ in fmt.socket_inputs(object_info[spec["type"]])]
        for name, (source, slot) in spec["links"].items():
            if name not in sockets:
                raise SystemExit(f"{spec['type']} (node {spec['id']}) has no socket input '{name}'")
        for target_slot, (name, kind, _) in enumerate(fmt.socket_inputs(object_info[spec["type"]])):
            if name in spec["links"]:
                source, slot = spec["links"][name]
                source_type = next(s["type"] for s in specs if s["id"] == source)
                # litegraph types a link by the input it enters, by the output only for untyped inputs
                kind = kind or object_info[source_type]["output"][slot]
                links.append([len(links) + 1, source, slot, spec["id"], target_slot, kind])
    return links


def execution_order(nodes: list[dict]) -> dict[int, int]:
    """litegraph's computeExecutionOrder: nodes without inputs first (file order), then as links resolve."""
    remaining = {n["id"]: sum(i["link"] is not None for i in n["inputs"]) for n in nodes}
    queue = [n for n in nodes if remaining[n["id"]] == 0]
    by_id = {n["id"]: n for n in nodes}
    link_target = {}
    for n in nodes:
        for i in n["inputs"]:
            if i["link"] is not None:
                link_target[i["link"]] = n["id"]
    order = []
    while queue:
        current = queue.pop(0)
        order.append(current["id"])
        for output in current["outputs"]:
            for link in output["links"] or []:
                target = link_target[link]
                remaining[target] -= 1
                if remaining[target] == 0:
                    queue.append(by_id[target])
    return {node_id: i for i, node_id in enumerate(order)}


def ui_node(spec: dict, info: dict, links: list[list]) -> dict:
    inputs = []
    for slot, (name, kind, optional) in enumerate(fmt.socket_inputs(info)):
        link = next((l[0] for l in links if l[3] == spec["id"] and l[4] == slot), None)
        inputs.append({"name": name, **({"shape": 7} if optional else {}), "type": kind, "link": link})
    outputs = []
    for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"])):
        out = [l[0] for l in links if l[1] == spec["id"] and l[2] == slot]
        outputs.append({"name": name, "type": kind, "links": out or None})
    node = {"id": spec["id"], "type": spec["type"], "pos": spec["pos"],
            "size": spec["size"] or default_size(info, len(outputs)), "flags": {}, "order": 0, "mode": 0,
            "inputs": inputs, "outputs": outputs}
    if spec["title"]:
        node["title"] = spec["title"]
    # In this key order frontend 1.27 saves a loaded file unchanged (tools/check_workflows_frontend.py).
    node["properties"] = {"Node name for S&R": spec["type"], **node_pack(spec["type"], info)}
    if spec["models"]:  # the frontend offers these downloads when the files are missing
        node["properties"]["models"] = [{"name": name, "url": f"{WAN_REPO}/{folder}/{name}?download=true",
                                         "directory": folder} for name, folder in spec["models"]]
    # Always a list, [] without widgets: what the frontend writes for a loaded graph, so that opening and
    # saving a file leaves it unchanged (a node created in the editor omits the key until then).
    node["widgets_values"] = widget_values(spec, info)
    return node


def node_pack(node_type: str, info: dict) -> dict:
    """The pack properties of a node: this pack's for a node loaded from custom_nodes, else ComfyUI's."""
    module = info.get("python_module")
    if module is None:
        raise SystemExit(f"{node_type}: /object_info gives no python_module (ComfyUI too old?)")
    return dict(PACK_PROPERTIES if module.startswith("custom_nodes.") else CORE_PROPERTIES)


def without_extension_inputs(prompt: dict) -> dict:
    """The API prompt less the inputs frontend extensions add to core nodes (fmt.EXTENSION_WIDGETS)."""
    for entry in prompt.values():
        for name in fmt.EXTENSION_WIDGETS.get(entry["class_type"], {}):
            entry["inputs"].pop(name, None)
    return prompt


def note_node(spec: dict) -> dict:
    node = {"id": spec["id"], "type": spec["type"], "pos": spec["pos"], "size": spec["size"], "flags": {},
            "order": 0, "mode": 0, "inputs": [], "outputs": []}
    if spec["title"]:
        node["title"] = spec["title"]
    return {**node, "properties": {}, "widgets_values": [spec["text"]], **NOTE_COLORS}


def build_ui(name: str, specs: list[dict], object_info: dict) -> dict:
    for spec in specs:
        if spec["type"] != "MarkdownNote" and spec["type"] not in object_info:
            raise SystemExit(f"{name}: this ComfyUI has no node '{spec['type']}' (is the pack installed?)")
    links = build_links(specs, object_info)
    nodes = [note_node(s) if s["type"] == "MarkdownNote" else ui_node(s, object_info[s["type"]], links)
             for s in specs]
    order = execution_order(nodes)
    for n in nodes:
        n["order"] = order[n["id"]]
    workflow = {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"longedit/workflows/{name}")),  # stable across rebuilds
        "revision": 0, "last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links),
        "nodes": nodes, "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.6, "offset": [40, 120]}, "frontendVersion": FRONTEND_VERSION},
        "version": 0.4,
    }
    return fmt.js_numbers(workflow)


def dump(data: dict) -> str:
    """JSON.stringify(data, null, 2), as the frontend writes files, plus a final newline for git."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def build_all(object_info: dict) -> dict[Path, str]:
    files = {}
    for name, graph in GRAPHS.items():
        ui = build_ui(name, graph(), object_info)
        files[WORKFLOWS / f"{name}.json"] = dump(ui)
        api = without_extension_inputs(fmt.ui_to_api(ui, object_info))
        files[WORKFLOWS / "api" / f"{name}.json"] = dump(fmt.js_numbers(api))
    return files


def fetch_object_info(server: str) -> dict:
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=120) as r:
        return json.loads(r.read())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--server", default="http://127.0.0.1:8188", help="a running ComfyUI with this pack")
    source.add_argument("--object-info", type=Path, help="a saved /object_info JSON instead of a server")
    ap.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    a = ap.parse_args(argv)
    object_info = json.loads(a.object_info.read_text()) if a.object_info else fetch_object_info(a.server)
    files = build_all(object_info)
    stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    if a.check:
        for p in stale:
            print(f"out of date: {p.relative_to(REPO)}")
        return 1 if stale else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(files)} files under {WORKFLOWS.relative_to(REPO)}/ ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ComfyUI nodes of LongEdit: thin wrappers that declare inputs/outputs and call core."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .adaflow_attention import AdaFlowAttentionSlimming
from .adaflow_edit import AdaFlowKeyframeEditing
from .adaflow_invert import AdaFlowInvert
from .adaflow_keyframes import AdaFlowKeyframeSelection
from .adaflow_propagation import AdaFlowLatentPropagation
from .isa_attention import IsaSparseAttention
from .liveditor import Liveditor, PadFramesForWan, TrimFramesToVideo
from .scale import SpreadOverGpus
from .video_encode import EncodeLongVideo
from .video_load import LoadLongVideo
from .video_save import DecodeSaveLongVideo, SaveLongVideo


class LongEditExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadLongVideo, EncodeLongVideo, DecodeSaveLongVideo, SaveLongVideo, AdaFlowKeyframeSelection,
                AdaFlowInvert, AdaFlowKeyframeEditing, AdaFlowLatentPropagation, AdaFlowAttentionSlimming,
                IsaSparseAttention, Liveditor, PadFramesForWan, TrimFramesToVideo, SpreadOverGpus]

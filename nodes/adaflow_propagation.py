"""AdaFlow Latent Propagation: MODEL -> MODEL; non-keyframes take their keyframe's attention output."""
from __future__ import annotations

from comfy_api.latest import io

from .adaflow_edit import editor_for, with_adaflow, adaflow_settings, CONFIG_KEY
from .adaflow_keyframes import KeyframesType


def propagate_from_keyframes(model, keyframes):
    """A clone whose non-keyframes receive, at every self-attention layer, the output of their clip's
    keyframe gathered through the precomputed correspondences (AdaFlow's propagation)."""
    patched = with_adaflow(model, propagate=keyframes)
    if "inversion" in adaflow_settings(patched):  # Keyframe Editing came first: check the whole setup now
        editor_for(patched.model_options["transformer_options"][CONFIG_KEY]())
    return patched


class AdaFlowLatentPropagation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LongEditAdaFlowLatentPropagation",
            display_name="AdaFlow Latent Propagation",
            category="LongEdit/adaflow",
            description=(
                "Carries the keyframe edit to every other frame: after each step's keyframe pass, the other frames "
                "run in chunks and, instead of attending, take their clip keyframe's self-attention output "
                "through the token correspondences of Keyframe Selection. Use together with AdaFlow Keyframe "
                "Editing (either order) and the same keyframes."),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x/SD2.x MODEL (before or after AdaFlow Keyframe Editing)."),
                KeyframesType.Input("keyframes", tooltip="From AdaFlow Keyframe Selection (the same as Keyframe Editing's)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched clone; the input MODEL is unchanged.")],
        )

    @classmethod
    def execute(cls, model, keyframes) -> io.NodeOutput:
        return io.NodeOutput(propagate_from_keyframes(model, keyframes))

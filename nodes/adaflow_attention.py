"""AdaFlow Attention Slimming: MODEL -> MODEL; how the keyframe pass slims its extended attention."""
from __future__ import annotations

from comfy_api.latest import io

from ..core.adaflow.slimming import ISA_BACKENDS, POLICIES, KeyframeSlimming
from .adaflow_edit import CONFIG_KEY, adaflow_settings, editor_for, with_adaflow


def slim_keyframe_attention(model, slimming: KeyframeSlimming):
    """A clone whose AdaFlow keyframe pass uses `slimming`. The setting sits beside Keyframe Editing's in the
    model's AdaFlow settings under its own key, so the two nodes give the same model in either order, and
    this node's policy and budget win over Keyframe Editing's kv_budget."""
    patched = with_adaflow(model, slimming=slimming.validate())
    if "inversion" in adaflow_settings(patched):  # Keyframe Editing came first: check the whole setup now
        editor_for(patched.model_options["transformer_options"][CONFIG_KEY]())
    return patched


class AdaFlowAttentionSlimming(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LongEditAdaFlowAttentionSlimming",
            display_name="AdaFlow Attention Slimming (AAS)",
            category="LongEdit/attention",
            description=(
                "Chooses how AdaFlow's keyframe pass slims its extended attention (every keyframe attending to "
                "the tokens of all keyframes, which grows with the square of the keyframe count): 'aas' keeps "
                "for each keyframe a budget of the most DIFT-similar keyframes' tokens (AdaFlow), 'isa' runs "
                "In-context Sparse Attention over [this keyframe | the other keyframes], 'full' keeps exact "
                "extended attention. Use with AdaFlow Keyframe Editing on the same MODEL, before or after it; "
                "this node's settings replace Keyframe Editing's kv_budget."),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x/SD2.x MODEL, before or after AdaFlow Keyframe Editing "
                                                "(it needs Keyframe Editing on the chain to act)."),
                io.Combo.Input("policy", options=list(POLICIES), default="aas",
                               tooltip="full: exact extended attention. aas: AdaFlow's Adaptive Attention "
                                       "Slimming with kv_budget (needs Keyframe Selection's DIFT ranking; "
                                       "without keyframes attention stays full). isa: In-context Sparse "
                                       "Attention with the alpha ratios below. Wins over Keyframe Editing's "
                                       "kv_budget, in either node order."),
                io.Int.Input("kv_budget", default=20, min=1, max=10_000,
                             tooltip="aas: keyframes whose full K/V every keyframe attends to; with more "
                                     "keyframes each keeps this many frames' worth of its most similar tokens. "
                                     "Replaces Keyframe Editing's kv_budget. Ignored by full and isa."),
                io.Float.Input("alpha_s", default=0.15, min=0.0, max=1.0, step=0.005,
                               tooltip="isa: share of the other keyframes' token blocks kept, ranked by how much "
                                       "this keyframe's tokens attend to them. 1 keeps all."),
                io.Float.Input("alpha_f", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="isa: share of each keyframe's query blocks (the sharpest) that take "
                                       "exact attention over the kept tokens; 1 with alpha_s 1 is exact "
                                       "extended attention. Lower is faster and less exact."),
                io.Float.Input("alpha_ns", default=0.0625, min=0.0, max=1.0, step=0.005,
                               tooltip="isa: for the other query blocks, share of kept blocks still attended "
                                       "token by token; the rest enter as one block-mean token each."),
                io.Int.Input("block_size", default=64, min=16, max=256, step=16,
                             tooltip="isa: tokens per block for pooling and routing (a power of two; ISA uses "
                                     "64). SD's coarser attention levels hold few tokens: smaller blocks "
                                     "route them more finely."),
                io.Combo.Input("backend", options=list(ISA_BACKENDS), default="auto",
                               tooltip="isa: auto runs the sharp blocks by SDPA and the rest by the Triton "
                                       "kernel on CUDA (torch elsewhere); torch never uses Triton."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched clone; the input MODEL is unchanged.")],
        )

    @classmethod
    def execute(cls, model, policy, kv_budget, alpha_s, alpha_f, alpha_ns, block_size, backend) -> io.NodeOutput:
        slimming = KeyframeSlimming(policy=policy, kv_budget=kv_budget, alpha_s=alpha_s, alpha_f=alpha_f,
                                    alpha_ns=alpha_ns, block_size=block_size, backend=backend)
        return io.NodeOutput(slim_keyframe_attention(model, slimming))

"""The pack loads through ComfyUI's own custom-node loader and declares well-formed nodes."""
OUR_NODES = {
    "LongEditLoadVideo": "Load Video (LongEdit)",
    "LongEditEncodeVideo": "Encode Video (LongEdit)",
    "LongEditDecodeSaveVideo": "Decode + Save Video (LongEdit)",
    "LongEditSaveVideo": "Save Video (LongEdit)",
    "LongEditAdaFlowKeyframeSelection": "AdaFlow Keyframe Selection",
    "LongEditAdaFlowInvert": "AdaFlow Invert (DDIM)",
    "LongEditAdaFlowKeyframeEditing": "AdaFlow Keyframe Editing",
    "LongEditAdaFlowLatentPropagation": "AdaFlow Latent Propagation",
    "LongEditAdaFlowAttentionSlimming": "AdaFlow Attention Slimming (AAS)",
    "LongEditIsaSparseAttention": "ISA Sparse Attention",
    "LongEditLiveditor": "LIVEditor (in-context video edit)",
    "LongEditPadFramesForWan": "Pad Frames for Wan VAE",
    "LongEditTrimFramesToVideo": "Trim Frames to Video",
    "LongEditSpreadOverGpus": "Spread Edit over GPUs (Ray)",
}


def test_nodes_appear_in_object_info(comfy):
    info = comfy.get("/object_info")
    missing = set(OUR_NODES) - set(info)
    assert not missing, f"not in /object_info: {missing}; log:\n{comfy.log.read_text()[-3000:]}"
    for node_id, display in OUR_NODES.items():
        node = info[node_id]
        assert node["display_name"] == display
        assert node["category"].startswith("LongEdit/")
        assert node["description"]
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_loaded_without_import_errors(comfy):
    log = comfy.log.read_text()
    assert "IMPORT FAILED" not in log or "longedit" not in log.split("IMPORT FAILED", 1)[1][:300], log[-3000:]

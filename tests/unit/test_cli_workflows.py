"""The runner's workflow handling without ComfyUI: the frontend's widget order, UI -> API conversion, --set."""
from __future__ import annotations

import json

import pytest

from longedit.cli.workflow_format import (WorkflowError, check_api, socket_inputs, ui_to_api, widget_names,
                                          with_api_values)
from longedit.cli.workflows import (VIDEO_LOADERS, CliError, apply_assignment, find_node, load_workflow,
                                    needs_sample, parse_assignment, positive_prompt_nodes, set_video,
                                    spread_over_gpus)

# A small /object_info in the server's own shape (required/optional, input_order, combos both ways).
OBJECT_INFO = {
    "Loader": {"input": {"required": {"file": ["COMBO", {"options": ["a.mp4"], "video_upload": True}],
                                      "count": ["INT", {"default": 0, "min": 0, "max": 10}]},
                         "optional": {"path": ["STRING", {"default": ""}], "extra": ["VIDEO", {}]}},
               "input_order": {"required": ["file", "count"], "optional": ["path", "extra"]},
               "output": ["LATENT"], "output_name": ["latent"], "display_name": "The Loader"},
    "Sampler": {"input": {"required": {"model": ["LATENT", {}], "seed": ["INT", {"default": 0}],
                                       "mode": [["fast", "slow"], {}], "positive": ["CONDITIONING", {}],
                                       "strength": ["FLOAT", {"default": 1.0, "min": 0, "max": 2}]}},
                "input_order": {"required": ["model", "seed", "mode", "positive", "strength"]},
                "output": ["LATENT"], "output_name": ["LATENT"], "display_name": "Sampler"},
    "Text": {"input": {"required": {"text": ["STRING", {"multiline": True}]}}, "input_order": {"required": ["text"]},
             "output": ["CONDITIONING"], "output_name": ["CONDITIONING"], "display_name": "Text"},
}


def test_widget_order_follows_the_frontend():
    # control_after_generate follows every seed; the upload button comes after all widgets, optional ones too
    assert widget_names(OBJECT_INFO["Sampler"]) == ["seed", "control_after_generate", "mode", "strength"]
    assert widget_names(OBJECT_INFO["Loader"]) == ["file", "count", "path", "upload"]
    assert socket_inputs(OBJECT_INFO["Loader"]) == [("extra", "VIDEO", True)]


def ui_graph(**sampler_widgets) -> dict:
    values = [sampler_widgets.get("seed", 5), "fixed", sampler_widgets.get("mode", "slow"),
              sampler_widgets.get("strength", 1.5)]
    return {"nodes": [
        {"id": 1, "type": "Loader", "inputs": [{"name": "extra", "shape": 7, "type": "VIDEO", "link": None}],
         "widgets_values": ["a.mp4", 3, "", "image"], "mode": 0},
        {"id": 2, "type": "Sampler", "title": "My sampler", "widgets_values": values, "mode": 0,
         "inputs": [{"name": "model", "type": "LATENT", "link": 1}, {"name": "positive", "type": "CONDITIONING",
                                                                      "link": 2}]},
        {"id": 3, "type": "Text", "widgets_values": ["a cat"], "mode": 0, "inputs": []},
        {"id": 4, "type": "MarkdownNote", "widgets_values": ["read me"], "mode": 0, "inputs": []},
    ], "links": [[1, 1, 0, 2, 0, "LATENT"], [2, 3, 0, 2, 1, "CONDITIONING"]]}


def test_ui_to_api_maps_widgets_by_name_and_links_by_slot():
    prompt = ui_to_api(ui_graph(), OBJECT_INFO)
    assert list(prompt) == ["1", "2", "3"]  # the note is frontend-only
    assert prompt["1"] == {"inputs": {"file": "a.mp4", "count": 3, "path": ""}, "class_type": "Loader",
                           "_meta": {"title": "The Loader"}}
    assert prompt["2"]["inputs"] == {"seed": 5, "mode": "slow", "strength": 1.5, "model": ["1", 0],
                                     "positive": ["3", 0]}
    assert prompt["2"]["_meta"]["title"] == "My sampler"
    assert check_api(prompt, OBJECT_INFO) == []


def test_ui_to_api_refuses_what_it_cannot_convert_faithfully():
    graph = ui_graph()
    graph["nodes"][1]["widgets_values"] = [5, "slow", 1.5]  # saved by a node version without the seed control
    with pytest.raises(WorkflowError, match="has 3 widget values but this ComfyUI defines 4"):
        ui_to_api(graph, OBJECT_INFO)
    graph = ui_graph()
    graph["nodes"][0]["mode"] = 4
    with pytest.raises(WorkflowError, match="bypassed"):
        ui_to_api(graph, OBJECT_INFO)


def test_changed_values_go_back_into_the_ui_graph():
    graph = ui_graph()
    prompt = ui_to_api(graph, OBJECT_INFO)
    prompt["2"]["inputs"].update(seed=9, strength=0.5)
    prompt["3"]["inputs"]["text"] = "a dog"
    updated = with_api_values(graph, prompt, OBJECT_INFO)
    assert updated["nodes"][1]["widgets_values"] == [9, "fixed", "slow", 0.5]
    assert updated["nodes"][2]["widgets_values"] == ["a dog"] and updated["nodes"][3]["widgets_values"] == ["read me"]
    assert graph["nodes"][1]["widgets_values"][0] == 5  # the original is left alone
    assert ui_to_api(updated, OBJECT_INFO) == prompt


def test_check_api_reports_values_and_links():
    prompt = ui_to_api(ui_graph(mode="medium", strength=3), OBJECT_INFO)
    prompt["2"]["inputs"]["positive"] = ["1", 0]
    problems = check_api(prompt, OBJECT_INFO)
    assert "node 2 (Sampler): input 'mode' = 'medium' is not one of ['fast', 'slow']" in problems
    assert "node 2 (Sampler): input 'strength' = 3 is outside [0, 2]" in problems
    assert "node 2 (Sampler): input 'positive' takes CONDITIONING but node 1 gives LATENT" in problems


def test_set_parses_titles_with_dots_and_coerces_by_input_type():
    prompt = ui_to_api(ui_graph(), OBJECT_INFO)
    prompt["2"]["_meta"]["title"] = "v1.5 sampler"
    a = parse_assignment("v1.5 sampler.strength=0.25")
    assert (a.node, a.input, a.text) == ("v1.5 sampler", "strength", "0.25")
    apply_assignment(prompt, a, OBJECT_INFO)
    apply_assignment(prompt, parse_assignment("1.count=7"), OBJECT_INFO)
    assert prompt["2"]["inputs"]["strength"] == 0.25 and prompt["1"]["inputs"]["count"] == 7
    for text, message in [("2.mode=medium", "must be one of fast, slow"), ("1.count=many", "takes INT"),
                          ("2.positive=x", "is connected to node 3"), ("2.nope=1", "has no input 'nope'")]:
        with pytest.raises(CliError, match=message):
            apply_assignment(prompt, parse_assignment(text), OBJECT_INFO)
    with pytest.raises(CliError, match="no node 'Sampler X'"):
        find_node(prompt, "Sampler X")


def test_prompt_and_video_targets(monkeypatch):
    prompt = ui_to_api(ui_graph(), OBJECT_INFO)
    assert positive_prompt_nodes(prompt) == ["3"]
    monkeypatch.setitem(VIDEO_LOADERS, "Loader", "file")
    assert not needs_sample(prompt, OBJECT_INFO)  # a.mp4 is in the input folder's list
    prompt["1"]["inputs"]["file"] = "gone.mp4"
    assert needs_sample(prompt, OBJECT_INFO)
    prompt["1"]["inputs"]["path"] = "elsewhere.mp4"
    set_video(prompt, "clip.mp4")
    assert prompt["1"]["inputs"]["file"] == "clip.mp4" and prompt["1"]["inputs"]["path"] == ""


def test_shipped_ui_files_map_to_their_api_twins(tmp_path):
    workflow = load_workflow("adaflow_long_video_edit")
    assert workflow.ui is not None and workflow.api is not None and "12" in workflow.api
    (tmp_path / "mine.json").write_text(json.dumps(workflow.api))
    assert load_workflow(str(tmp_path / "mine.json")).ui is None  # API files run as they are
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(CliError, match="not a ComfyUI workflow"):
        load_workflow(str(tmp_path / "bad.json"))


def test_gpus_puts_the_spread_node_between_the_last_adaflow_model_and_its_sampler():
    prompt = load_workflow("adaflow_long_video_edit").api
    before = json.loads(json.dumps(prompt))
    added = spread_over_gpus(prompt, 3, "ray://head:10001")
    assert len(added) == 2
    sampling, inversion = (prompt[i] for i in added)
    assert sampling["class_type"] == inversion["class_type"] == "LongEditSpreadOverGpus"
    assert sampling["inputs"] == {"model": ["11", 0], "gpus": 3, "ray_address": "ray://head:10001"}
    assert prompt["12"]["inputs"]["model"] == [added[0], 0]  # the sampler now samples the spread model
    # Keyframe Selection and Invert spread their chunks too: their MODEL (the checkpoint's) goes through one
    # spread node
    assert inversion["inputs"] == {"model": ["1", 0], "gpus": 3, "ray_address": "ray://head:10001"}
    assert prompt["9"]["inputs"]["model"] == prompt["6"]["inputs"]["model"] == [added[1], 0]
    for node_id, entry in before.items():  # nothing else moved: the chain edit -> propagation keeps its links
        if node_id not in ("12", "9", "6"):
            assert prompt[node_id] == entry, node_id
    for node_id in ("12", "9", "6"):
        assert {k: v for k, v in prompt[node_id]["inputs"].items() if k != "model"} == \
            {k: v for k, v in before[node_id]["inputs"].items() if k != "model"}


def test_gpus_without_an_adaflow_edit_is_refused():
    with pytest.raises(CliError, match="no AdaFlow Keyframe Editing"):
        spread_over_gpus(load_workflow("isa_wan_video").api, 2)
    with pytest.raises(CliError, match="--gpus 0"):
        spread_over_gpus(load_workflow("adaflow_long_video_edit").api, 0)

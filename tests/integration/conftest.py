"""The integration tier's ComfyUI server (see tests/comfy_harness.py); skipped when COMFYUI_PATH is unset."""
import pytest

from comfy_harness import start_comfy, stop_comfy


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    server = start_comfy(tmp_path_factory.mktemp("comfy_base"))
    yield server
    stop_comfy(server)

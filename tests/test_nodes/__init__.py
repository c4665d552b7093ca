"""Test-only ComfyUI nodes that stand in for other packs' outputs (loaded by tests/comfy_harness.py beside the
pack; never shipped). Written from the behaviour described in the interop contracts, not from their code."""
from collections.abc import Mapping


class LazySilentAudio(Mapping):
    """An AUDIO as VideoHelperSuite passes a silent video's: a mapping that decodes when read and raises,
    because there is no audio stream to decode."""

    def __getitem__(self, key):
        raise RuntimeError("ffmpeg: the file has no audio stream")  # what a lazy decoder says when read

    def __iter__(self):
        return iter(("waveform", "sample_rate"))

    def __len__(self):
        return 2


class TestLazySilentAudio:
    CATEGORY = "testing"
    RETURN_TYPES = ("AUDIO",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def make(self):
        return (LazySilentAudio(),)


NODE_CLASS_MAPPINGS = {"TestLazySilentAudio": TestLazySilentAudio}

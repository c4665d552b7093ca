"""LongEdit: long-video editing nodes for ComfyUI (AdaFlow, ISA).

ComfyUI imports this folder as a package and calls `comfy_entrypoint`. The nodes are imported lazily so
that `core` and `kernels` can be used and tested without ComfyUI.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    from .nodes import LongEditExtension

    return LongEditExtension()

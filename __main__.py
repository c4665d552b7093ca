"""`python -m longedit run ...` (pack installed with `pip install -e <pack>`, or run from the folder holding a
checkout named `longedit`), or `python <pack>/__main__.py run ...` from anywhere (any folder name)."""
import os
import sys

if __package__:
    from .cli import main
else:
    import importlib.util

    HERE = os.path.dirname(os.path.abspath(__file__))
    # Python put this folder first on sys.path; its `nodes` package would hide ComfyUI's `nodes` module.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
    spec = importlib.util.spec_from_file_location("longedit", os.path.join(HERE, "__init__.py"),
                                                  submodule_search_locations=[HERE])
    package = importlib.util.module_from_spec(spec)
    sys.modules["longedit"] = package
    spec.loader.exec_module(package)
    from longedit.cli import main

if __name__ == "__main__":
    sys.exit(main())

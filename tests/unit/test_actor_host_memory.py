"""A Ray actor reads a keyframe record of ~130 MB every step (core/scale/pool.keep_freed_host_memory): with
glibc's defaults its freed buffers went back to the system and each step faulted the record in afresh, page by
page (measured on one H200: 0.18 s per read against 0.07 s). Page faults are counted here, not time: in a fresh
process, repeated reads of such a record fault in most of its pages again with the defaults, and almost none
once the actor's setting is made."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

READS = 10
SCRIPT = r'''
import importlib.util, json, os, pickle, resource, sys
import torch
repo = sys.argv[2]
spec = importlib.util.spec_from_file_location("longedit", os.path.join(repo, "__init__.py"),
                                              submodule_search_locations=[repo])
module = importlib.util.module_from_spec(spec); sys.modules["longedit"] = module; spec.loader.exec_module(module)
from longedit.core.scale.pool import keep_freed_host_memory
if sys.argv[1] == "kept":
    assert keep_freed_host_memory()
record = {f"layer{i}": torch.randn(2, 4032, 320).half() for i in range(25)}  # [clips, rows, T, C] per layer
blob = pickle.dumps(record)
del record
faults = []
for _ in range(int(sys.argv[3])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    received = pickle.loads(blob)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del received
print(json.dumps({"faults": faults, "pages": len(blob) // os.sysconf("SC_PAGE_SIZE")}))
'''


def reads(mode: str) -> tuple[list[int], int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(REPO), str(READS)], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["faults"], result["pages"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (Linux)")
def test_an_actor_reads_each_step_record_into_memory_it_kept():
    plain, pages = reads("plain")
    kept, _ = reads("kept")
    # the defaults: later reads fault much of the record in again (measured: 40-280% of its pages over 9 reads)
    assert sum(plain[1:]) > 0.2 * pages, plain
    # kept: later reads reuse the memory of the ones before (measured: under 2%)
    assert sum(kept[1:]) < 0.05 * pages, kept

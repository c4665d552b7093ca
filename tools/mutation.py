"""Mutation testing of AdaFlow's core with cosmic-ray, each module against the tests that pin it.

    python tools/mutation.py [--modules adaflow_attention,...] [--sample N] [--seed S] [--out DIR]

For each module of `MODULES` this copies the working tree to DIR/tree (the worktree itself is never
mutated), lets cosmic-ray enumerate its mutants (`cosmic-ray init`), drops the operator families listed
in OPERATORS_KEPT's complement (type-level or syntax-level rewrites such as `|` in annotations or `>>`
for `+`, which only crash or are equivalent), optionally keeps a random sample of N mutants per module
(the rest are marked skipped), runs them (`cosmic-ray exec`), and prints the report: killed, survived,
and each survivor's diff.

Speed: every mutant's test run would pay ~3 s of `import torch`; instead the test command is a small
client of a fork server started here, which has imported torch, triton, numpy and pytest once and forks
a fresh child per mutant (the pack itself is imported in the child, after the mutant is on disk).

Needs: cosmic-ray (requirements-test.txt), the unit tier, and for the reference tier COMFYUI_PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# module -> the tests that pin it (kept small: every mutant runs them; -x stops at the first failure)
UNIT = "tests/unit/"
REF = "tests/reference/"
MODULES = {
    "adaflow_attention": [UNIT + "test_adaflow_semantics.py", UNIT + "test_adaflow_edit.py",
                          UNIT + "test_propagation.py", UNIT + "test_keyframe_isa.py"],
    "adaflow_edit": [UNIT + "test_adaflow_semantics.py", UNIT + "test_adaflow_edit.py", UNIT + "test_propagation.py",
                     UNIT + "test_keyframe_isa.py"],
    "keyframe_isa": [UNIT + "test_keyframe_isa.py"],
    "keyframe_slimming": [UNIT + "test_keyframe_isa.py"],
    "keyframes": [UNIT + "test_keyframes.py", UNIT + "test_adaflow_semantics.py", UNIT + "test_propagation.py",
                  UNIT + "test_policy_semantics.py"],
    "inversion": [UNIT + "test_adaflow_edit.py", REF + "test_inversion.py"],
    "run_plan": [UNIT + "test_run_plan.py", UNIT + "test_policy_semantics.py"],
    "isa_policy": [UNIT + "test_policy_semantics.py"],
}
# where each module lives under core/
MODULE_FILES = {"adaflow_attention": "adaflow/attention.py", "adaflow_edit": "adaflow/edit.py",
                "keyframes": "adaflow/keyframes.py", "inversion": "adaflow/inversion.py", "run_plan": "run_plan.py",
                "isa_policy": "isa/policy.py", "keyframe_isa": "adaflow/keyframe_isa.py",
                "keyframe_slimming": "adaflow/slimming.py"}
# The keyframe-pass reference test (tests/reference/test_keyframe_pass_reference.py, ~3 min on 2 shared cores)
# is left out of the per-mutant selection: with `--with-reference` it is added for the adaflow modules.
KEYFRAME_REFERENCE = REF + "test_keyframe_pass_reference.py"

# Operator families run (regexes over cosmic-ray operator names); every other family is skipped.
OPERATORS_KEPT = (
    r"ReplaceComparisonOperator_(Lt|LtE|Gt|GtE|Eq|NotEq)_(Lt|LtE|Gt|GtE|Eq|NotEq)$",
    r"ReplaceBinaryOperator_(Add_Sub|Sub_Add|Mul_Div|Div_Mul|FloorDiv_Div|Mul_Add|Add_Mul)$",
    r"NumberReplacer$", r"AddNot$", r"ReplaceTrueWithFalse$", r"ReplaceFalseWithTrue$", r"ReplaceAndWithOr$",
    r"ReplaceOrWithAnd$", r"ZeroIterationForLoop$", r"ReplaceUnaryOperator_USub_UAdd$", r"ReplaceBreakWithContinue$",
)
TIMEOUT_S = 240.0


# ------------------------------------------------------------------------------------------- fork server

def serve(sock_path: str) -> None:
    """Import the heavy libraries once; per request fork a child that runs pytest in a fresh pack import."""
    if "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
    import numpy  # noqa: F401
    import pytest
    import torch

    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    if os.environ.get("COMFYUI_PATH"):  # the reference tier's heavy imports, also once
        try:
            import diffusers  # noqa: F401
        except ImportError:
            pass
    torch.set_num_threads(1)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(1)
    while True:
        conn, _ = server.accept()
        request = json.loads(conn.makefile().readline())
        pid = os.fork()
        if pid == 0:
            server.close()
            os.chdir(request["cwd"])
            sys.path.insert(0, request["cwd"])
            log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = pytest.main(request["args"])
            sys.stdout.flush()
            os._exit(int(code))
        deadline = time.time() + request["timeout"]
        status = None
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = 1 << 8  # a hang counts as a kill, as cosmic-ray's own timeout does
        code = os.waitstatus_to_exitcode(status)
        conn.sendall(f"{code}\n".encode())
        conn.close()


def client(sock_path: str, log: str, args: list[str]) -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sock_path)
    conn.sendall((json.dumps({"cwd": os.getcwd(), "args": args, "log": log, "timeout": TIMEOUT_S}) + "\n").encode())
    code = int(conn.makefile().readline())
    return 0 if code == 0 else 1


# ------------------------------------------------------------------------------------------------ driver

def copy_tree(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the worktree (what the tests import)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def write_config(path: Path, module_file: Path, tests: list[str], sock: Path, log: Path) -> None:
    test_args = ["-x", "-q", "-p", "no:cacheprovider", *tests]
    command = " ".join([str(BIN / "python"), str(REPO / "tools" / "mutation.py"), "client", str(sock), str(log),
                        "--", *test_args])
    kept = "|".join(f"(?:{k})" for k in OPERATORS_KEPT)
    path.write_text("\n".join([
        "[cosmic-ray]", f'module-path = "{module_file}"', f"timeout = {TIMEOUT_S}", "excluded-modules = []",
        f'test-command = "{command}"', "", "[cosmic-ray.distributor]", 'name = "local"', "",
        "[cosmic-ray.filters.operators-filter]", f"exclude-operators = ['core/(?!{kept})']", ""]))


def sample_jobs(db: Path, sample: int, seed: int) -> None:
    """Keep `sample` pending mutants at random; mark the others skipped (cosmic-ray then leaves them)."""
    with sqlite3.connect(db) as con:
        pending = [r[0] for r in con.execute(
            "SELECT job_id FROM mutation_specs WHERE job_id NOT IN (SELECT job_id FROM work_results)")]
        if len(pending) <= sample:
            return
        drop = set(pending) - set(random.Random(seed).sample(sorted(pending), sample))
        con.executemany("INSERT INTO work_results (job_id, worker_outcome, output, test_outcome, diff) "
                        "VALUES (?, 'SKIPPED', 'not sampled', NULL, NULL)", [(j,) for j in drop])


def summarise(db: Path) -> dict:
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT m.job_id, m.operator_name, m.start_pos_row, r.worker_outcome, r.test_outcome, r.diff "
            "FROM mutation_specs m JOIN work_results r ON m.job_id = r.job_id").fetchall()
    ran = [r for r in rows if r[3] == "NORMAL"]
    killed = [r for r in ran if r[4] == "KILLED"]
    survived = [r for r in ran if r[4] == "SURVIVED"]
    return {"ran": len(ran), "killed": len(killed), "survived": survived,
            "incompetent": sum(r[4] == "INCOMPETENT" for r in ran),
            "abnormal": sum(r[3] not in ("NORMAL", "SKIPPED") for r in rows)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        return client(sys.argv[2], sys.argv[3], sys.argv[sys.argv.index("--") + 1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", default=",".join(MODULES))
    parser.add_argument("--sample", type=int, default=0, help="mutants per module (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/longedit-mutation")
    parser.add_argument("--with-reference", action="store_true",
                        help="also run the keyframe-pass reference test for every adaflow mutant (slow)")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    tree = out / "tree"
    copy_tree(tree)
    sock = out / "server.sock"
    server = subprocess.Popen([str(BIN / "python"), str(Path(__file__).resolve()), "serve", str(sock)], cwd=tree)
    try:
        while not sock.exists():
            time.sleep(0.2)
        totals = {"ran": 0, "killed": 0}
        for name in args.modules.split(","):
            tests = MODULES[name] + ([KEYFRAME_REFERENCE] if args.with_reference and name.startswith("adaflow") else [])
            tests = [t for t in tests if (tree / t).exists()]
            cfg, db, log = out / f"{name}.toml", out / f"{name}.sqlite", out / f"{name}.log"
            write_config(cfg, tree / "core" / MODULE_FILES[name], tests, sock, log)
            cr = lambda *a: subprocess.run([str(BIN / a[0]), *a[1:]], cwd=tree, check=True)  # noqa: E731
            cr("cosmic-ray", "init", str(cfg), str(db))
            cr("cr-filter-operators", str(db), str(cfg))
            if args.sample:
                sample_jobs(db, args.sample, args.seed)
            start = time.time()
            cr("cosmic-ray", "exec", str(cfg), str(db))
            s = summarise(db)
            totals["ran"] += s["ran"]
            totals["killed"] += s["killed"]
            print(f"== {name}: {s['ran']} mutants run, {s['killed']} killed, {len(s['survived'])} survived, "
                  f"{s['incompetent']} incompetent, {s['abnormal']} abnormal ({time.time() - start:.0f} s; tests: "
                  f"{' '.join(tests)})", flush=True)
            for job, op, row, _, _, diff in s["survived"]:
                print(f"-- survivor {job[:8]} {op} line {row}\n{diff}", flush=True)
        if totals["ran"]:
            print(f"== total: {totals['killed']}/{totals['ran']} killed "
                  f"({100 * totals['killed'] / totals['ran']:.1f}% before removing equivalent mutants)")
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``linft bench``: run every benchmark script of benchmarks/ and summarise its ratios.

Each script runs as a subprocess (``--quick`` where the script has it) and measures linft against
its plain-PyTorch reference side by side in the same run; this command prints the scripts' output
and a summary line per ratio. CPU figures are always printed; on a GPU machine the summary (with
device and versions) is appended to benchmarks/RESULTS.md with ``--record``. Without a GPU it says so.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
# script -> (args for --quick, args for a full run, the JSON fields that hold a ratio vs the reference)
SCRIPTS = {
    "linearize_step.py": (["lite0_k3"], [], ("ratio", "mem_ratio")),
    "data_loader.py": (["--images-per-class", "8", "--steps", "3", "--batches", "3"], [], ("value",)),
    "loop_throughput.py": (["--quick"], [], ("throughput_vs_compute",)),
    "multirun.py": (["--quick"], [], ("throughput_vs_sequential",)),
    "trainer_throughput.py": (["--quick"], [], ("ratio",)),
}


def _label(rec: dict) -> str:
    parts = [rec.get(k) for k in ("bench", "name", "tail", "group", "row", "variant", "num_workers")
             if rec.get(k) is not None]
    return "/".join(str(p) for p in parts)


def run_all(quick: bool = True, only: list[str] | None = None, timeout: float = 1800) -> list[dict]:
    """Run the scripts; returns one summary dict per script (name, rc, seconds, ratio records)."""
    out = []
    for name, (qargs, fargs, fields) in SCRIPTS.items():
        if only and name not in only and name.removesuffix(".py") not in only:
            continue
        cmd = [sys.executable, str(BENCH_DIR / name)] + (qargs if quick else fargs)
        print(f"== {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=BENCH_DIR.parent)
            rc, text = proc.returncode, proc.stdout + ("" if proc.returncode == 0 else proc.stderr[-3000:])
        except subprocess.TimeoutExpired as e:
            rc, text = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(text.rstrip(), flush=True)
        ratios = []
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if name == "data_loader.py" and rec.get("variant") != "ratio":
                    continue  # its other records are absolute images/s and s/step, not ratios
                for f in fields:
                    if f in rec and isinstance(rec[f], (int, float)):
                        ratios.append({"what": _label(rec), "field": f, "value": rec[f]})
        out.append({"script": name, "rc": rc, "seconds": round(time.perf_counter() - t, 1), "ratios": ratios})
    return out


def _device() -> tuple[str, bool]:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(), True
    return f"CPU ({platform.processor() or platform.machine()})", False


def summary_lines(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        status = "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']}"
        lines.append(f"{r['script']}: {status}, {r['seconds']} s")
        for x in r["ratios"]:
            lines.append(f"  {x['what']:<44} {x['field']:<26} {x['value']}")
    return lines


def _cmd(args) -> int:
    import torch
    device, gpu = _device()
    print(f"linft bench on {device}, torch {torch.__version__}, python {platform.python_version()}"
          + ("" if gpu else " -- no GPU present: CPU figures only (reduced sizes); GPU floors are not checked"))
    results = run_all(quick=not args.full, only=args.only or None)
    lines = summary_lines(results)
    print("\n== summary (ratios vs the plain-PyTorch reference measured in the same run)")
    print("\n".join(lines))
    if args.record and gpu:
        with open(BENCH_DIR / "RESULTS.md", "a") as f:
            f.write(f"\n## linft bench, {time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}"
                    f"{'' if args.full else ' (--quick)'}\n```\n" + "\n".join(lines) + "\n```\n")
        print("appended to benchmarks/RESULTS.md")
    elif args.record:
        print("no GPU: nothing recorded in benchmarks/RESULTS.md (CPU figures above)")
    return 0 if all(r["rc"] == 0 for r in results) else 1


def register(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmarks (benchmarks/*.py) and print ratios vs plain PyTorch")
    p.add_argument("--full", action="store_true", help="full-size runs (default: each script's quick mode)")
    p.add_argument("--only", nargs="*", default=[], help="a subset of scripts, e.g. multirun loop_throughput")
    p.add_argument("--record", action="store_true", help="on a GPU, append the summary to benchmarks/RESULTS.md")
    p.set_defaults(func=_cmd)

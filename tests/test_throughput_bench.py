"""linft bench (issue #7, part 4): command registration, script list and summary, no subprocess runs."""
import argparse

from linft.cli import bench


def test_register_and_scripts_exist():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    bench.register(sub)
    args = ap.parse_args(["bench", "--only", "multirun", "--record"])
    assert args.func is bench._cmd and args.only == ["multirun"] and args.record and not args.full
    for name in bench.SCRIPTS:
        assert (bench.BENCH_DIR / name).is_file(), name


def test_summary_lines():
    res = [{"script": "multirun.py", "rc": 0, "seconds": 1.0,
            "ratios": [{"what": "multirun/vmap", "field": "throughput_vs_sequential", "value": 1.7}]},
           {"script": "x.py", "rc": 3, "seconds": 0.1, "ratios": []}]
    lines = bench.summary_lines(res)
    assert lines[0].startswith("multirun.py: ok") and "1.7" in lines[1] and "FAILED rc=3" in lines[2]

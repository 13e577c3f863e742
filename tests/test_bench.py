"""`python -m kt_patch bench`: the JSON report the issue specifies, and clear errors for bad arguments."""
import json
import subprocess
import sys

import pytest

from kt_patch import bench


def test_bench_json_report(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--shapes", "small", "--qlens", "7,33", "--threads", "1", "--min-time", "0",
                "--backends", "kt_patch,torch_bf16", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["isas"]
    assert report["kt_patch"]["isa"] in report["machine"]["isas"]
    rows = {(r["backend"], r["qlen"]): r for r in report["results"]}
    assert set(rows) == {(b, q) for b in ("kt_patch", "torch_bf16") for q in (7, 33)}
    for (backend, qlen), row in rows.items():
        assert row["shape"] == "small" and row["threads"] == 1
        assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0
        assert row["tokens_per_s"] == pytest.approx(qlen / ((row["fwd_ms"] + row["bwd_ms"]) / 1e3))
    output = capsys.readouterr()
    assert "x torch_bf16" in output.out and output.out.count("kt_patch ") >= 2
    progress = [line for line in output.err.splitlines() if line.startswith("bench: ")]
    assert [line.split(":")[1] for line in progress] == [f" {b} small qlen {q}" for b in ("kt_patch", "torch_bf16")
                                                         for q in (7, 33)]


def test_bench_defaults_are_the_short_run(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--threads", "1", "--min-time", "0", "--backends", "kt_patch", "--json", str(out)])
    assert {(r["shape"], r["qlen"]) for r in json.loads(out.read_text())["results"]} == {("small", 128),
                                                                                          ("small", 512)}


@pytest.mark.parametrize("args, message", [
    (["--shapes", "qwen3"], "unknown shape qwen3; choose from qwen30b, small"),
    (["--backends", "kt_patch,vllm"], "unknown backend vllm"),
    (["--qlens", "128,x"], "--qlens takes a comma list of integers"),
    (["--qlens", "0"], "--qlens must be >= 1"),
])
def test_bench_rejects_bad_arguments(args, message):
    run = subprocess.run([sys.executable, "-m", "kt_patch", "bench", *args], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr

"""Smoke runs of the benchmark scripts at toy sizes, so they keep working as the code changes."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, *args):
    """Run benchmarks/<name> with `args`; return its stdout (a failure shows stderr)."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_eval_toy_run_matches_authors_loop():
    out = run_script("bench_eval.py", "--image_size", "32", "--gen_size", "40", "--scored", "12",
                     "--classes", "3", "--support_per_class", "2", "--repeats", "1", "--backbone_batch", "4",
                     "--authors_scored", "4", "--batch_size", "8", "--threads", "1")
    # The batched pipeline scores the re-created authors' loop's images the same way.
    gap = float(re.search(r"max \|normality diff\| ([0-9.e+-]+), same prediction 100%", out).group(1))
    assert gap < 1e-5
    for section in ("## (a) backbone alone", "(b) evaluate_split", "1 relational call with all prototypes",
                    "## (d) fp32 vs bf16 agreement", "## summary", "target amp none >= 1.5x"):
        assert section in out


def test_bench_scorers_times_every_registered_scorer():
    from evaluation.scorers import SCORERS
    out = run_script("bench_scorers.py", "--sizes", "tiny", "--threads", "1", "--dim", "16",
                     "--scorers", *SCORERS)
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny ")]
    assert [row[1] for row in rows] == list(SCORERS)
    assert all(float(row[4]) >= 0 for row in rows)


def test_bench_train_gpu_runs_both_pipelines_on_the_cpu():
    out = run_script("bench_train_gpu.py", "--device", "cpu", "--image_size", "32", "--pairs", "4", "--steps", "2",
                     "--warmup", "1", "--images", "12", "--classes", "3", "--source_size", "48", "40",
                     "--workers", "0", "--amps", "none")
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["none"]]
    assert [row[1] for row in rows] == ["compute", "workers", "device"]
    assert all(float(row[2]) > 0 for row in rows)
    assert "target: none end to end (device) >= 90% of compute-only" in out


def test_bench_only_eval_times_a_real_process_and_reads_its_phases():
    out = run_script("bench_only_eval.py", "--device", "cpu", "--support", "12", "--scored", "10", "--side", "36",
                     "--image_size", "32", "--depth", "1", "--num_workers", "0", "--evaluators", "default")
    assert "12 support + 10 scored 36 px JPEGs, 6 known classes" in out
    (row,) = [line.split() for line in out.splitlines() if line.startswith("default ")]
    wall, load, features, scoring, writing, after = map(float, row[3:])
    # The process's wall time holds every phase its manifest records.
    assert wall > load + after and after == pytest.approx(features + scoring + writing, abs=0.02)


def test_bench_export_times_both_paths_and_agrees_in_fp32():
    out = run_script("bench_export.py", "--image_size", "32", "--gen_size", "40", "--classes", "3",
                     "--support_per_class", "2", "--images", "4", "--batches", "1", "4", "--repeats", "1",
                     "--depth", "1", "--threads", "1", "--dtypes", "fp32")
    assert "export (fit + torch.export + save + check)" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["fp32"]]
    assert [row[1] for row in rows] == ["1", "4"]
    for row in rows:
        repository_ms, exported_ms, gap = float(row[2]), float(row[3]), float(row[5])
        # The exported program scores the images as the repository does.
        assert repository_ms > 0 and exported_ms > 0 and gap < 1e-5

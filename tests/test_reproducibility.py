"""Same parameters, same numbers: the shell's OMP_NUM_THREADS does not change a reproduction's summary.json."""
import os
import subprocess
import sys

MMR = [sys.executable, "-c", "import sys; from mm_research.cli import main; sys.exit(main())"]


def reproduce(tmp_path, name: str, omp: str):
    "Reproduce one experiment with `OMP_NUM_THREADS=omp`, a cold cache of its own, results in a scratch folder."
    env = {**os.environ, "OMP_NUM_THREADS": omp, "MKL_NUM_THREADS": omp, "MMR_CACHE": str(tmp_path / f"cache{omp}"),
           "MMR_RUNS": str(tmp_path / f"runs{omp}")}
    out = subprocess.run([*MMR, "reproduce", "--only", name, "--results", str(tmp_path / f"results{omp}")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp_path / f"results{omp}"


def test_summary_is_identical_whatever_the_shell_threads(tmp_path):
    one, two = reproduce(tmp_path, "30_gated", "1"), reproduce(tmp_path, "30_gated", "2")
    assert (one / "summary.json").read_bytes() == (two / "summary.json").read_bytes()
    envs = [__import__("json").loads((d / "reproduction.json").read_text())["environment"] for d in (one, two)]
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["1", "2"]  # the shells did differ
    assert [e["torch_threads"] for e in envs] == [1, 1]  # and the runs pinned their threads

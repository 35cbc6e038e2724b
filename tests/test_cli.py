"""`mmr`: list, run (papermill end to end), reproduce, and the errors it gives before running anything."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from mm_research.cli import main

MMR = [sys.executable, "-c", "import sys; from mm_research.cli import main; sys.exit(main())"]


def mmr(*args, env=None, cwd=None):
    "Run the `mmr` entry point in a subprocess; returns the CompletedProcess."
    return subprocess.run([*MMR, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd,
                          timeout=600)


def test_list_shows_notebooks_parameters_defaults_and_types():
    out = mmr("list")
    assert out.returncode == 0, out.stderr
    names = [ln for ln in out.stdout.splitlines() if ln and not ln.startswith(" ")]
    assert names == sorted(names) and {"01_presets", "10_speech", "20_llava", "21_pruning", "30_gated"} <= set(names)
    assert "batch_size       int    = 2" in out.stdout


def test_run_real_notebook_with_override(runs):
    out = mmr("run", "01_presets", "-p", "batch_size", "3", "--device", "cpu", env={"MMR_RUNS": str(runs)})
    assert out.returncode == 0, out.stderr
    (folder,) = list((runs / "01_presets").iterdir())
    params = json.loads((folder / "params.json").read_text())
    assert params["batch_size"] == 3 and params["device"] == "cpu" and params["new_tokens"] == 3
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {v["batch_size"] for v in metrics["tiny"].values()} == {3}  # the override reached the notebook
    assert metrics["reference"]["llava-1.5-7b"]["parameters"] == 7_063_427_072
    env = json.loads((folder / "environment.json").read_text())
    assert env["device"] == "cpu" and env["transformers"].startswith("5.")
    executed = nbformat.read(folder / "01_presets.ipynb", as_version=4)
    assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")


def _notebook(path, *sources, params="x = 1\nrun_dir = None"):
    cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]})]
    cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def nbs(tmp_path, monkeypatch):
    "A notebooks folder with one passing and one failing runnable notebook."
    d = tmp_path / "nbs"
    d.mkdir()
    _notebook(d / "50_ok.ipynb", "import json, pathlib\n"
              "pathlib.Path(run_dir, 'metrics.json').write_text(json.dumps({'x_seen': x}))")
    _notebook(d / "60_fails.ipynb", "y = x * 2", "raise RuntimeError('boom in the third cell')", "z = 3")
    monkeypatch.setenv("MMR_NBS", str(d))
    return d


def test_failing_notebook_exits_nonzero_and_keeps_executed_notebook(nbs, runs):
    out = mmr("run", "60_fails", "-p", "x", "5")
    assert out.returncode == 1
    assert "failed in cell In[4] `raise RuntimeError('boom in the third cell')`" in out.stderr
    assert "RuntimeError: boom in the third cell" in out.stderr
    (folder,) = list((runs / "60_fails").iterdir())
    executed = nbformat.read(folder / "60_fails.ipynb", as_version=4)
    assert any(o.get("ename") == "RuntimeError" for c in executed.cells for o in c.get("outputs", []))
    assert json.loads((folder / "params.json").read_text())["x"] == 5


@pytest.mark.parametrize("args, message", [
    (["run", "99_nope"], "Unknown experiment '99_nope'"),
    (["run", "50_ok", "-p", "y", "1"], "50_ok has no parameter 'y'"),
    (["run", "50_ok", "-p", "x", "one"], "Parameter 'x' expects int"),
])
def test_bad_input_is_refused_before_running(nbs, runs, args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not runs.exists()  # nothing ran, nothing was written


def test_reproduce_continues_past_failure_and_reports(nbs, runs, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("50_ok:\n  x: 7\n")
    out = mmr("reproduce", "-f", str(params))
    assert out.returncode == 1 and "Failed: 60_fails" in out.stderr
    (root,) = [p for p in (runs / "reproduce").iterdir() if p.is_dir()]
    results = {r["name"]: r for r in json.loads((root / "results.json").read_text())}
    assert results["50_ok"]["status"] == "ok" and results["60_fails"]["status"] == "failed"
    assert json.loads((root / "50_ok" / "metrics.json").read_text()) == {"x_seen": 7}
    report = (root / "report.md").read_text()
    assert "| [60_fails](60_fails/60_fails.ipynb) | failed |" in report and "x_seen | 7" in report
    assert (root / "report.html").read_text().startswith("<!doctype html>")


def test_reproduce_validates_parameter_files_first(nbs, runs, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("50_ok:\n  x: not-a-number\n")
    out = mmr("reproduce", "-f", str(bad))
    assert out.returncode == 2 and "Parameter 'x' expects int" in out.stderr
    assert not (runs / "reproduce").exists()


def test_inspect_prints_the_report_of_a_7b_model_without_weights():
    out = mmr("inspect", "qwen2-audio-7b")
    assert out.returncode == 0, out.stderr
    assert "8,397,094,912 parameters on meta; parameter storage 0 bytes" in out.stdout
    assert "out_proj" in out.stdout and "audio_tower" in out.stdout
    js = mmr("inspect", "llava-1.5-7b", "--json", "--depth", "1")
    report = json.loads(js.stdout)
    assert js.returncode == 0 and json.dumps(report)  # JSON-serialisable
    assert "7063427072" in js.stdout.replace(",", "")


def test_memory_command_measures_a_tiny_preset():
    out = mmr("memory", "tiny-efficientnet", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "forward" in out.stdout and "train_step" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["inspect", "qwen2-audio-7c"], "Did you mean 'qwen2-audio-7b'"),
    (["memory", "tiny-efficientnet", "--device", "cuda:7"], "cuda"),
])
def test_model_commands_give_clear_errors(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_run_takes_its_own_section_of_a_shared_parameter_file(nbs, runs, tmp_path):
    shared = tmp_path / "all.yaml"
    shared.write_text("50_ok:\n  x: 9\n60_fails:\n  x: 1\n")
    out = mmr("run", "50_ok", "-f", str(shared))
    assert out.returncode == 0, out.stderr
    (folder,) = list((runs / "50_ok").iterdir())
    assert json.loads((folder / "metrics.json").read_text()) == {"x_seen": 9}


@pytest.mark.parametrize("text, message", [
    ("50_ok: [1, 2\n", "is not valid YAML at line"),
    ("- 1\n- 2\n", "expected a mapping of experiment name"),
    ("51_nope:\n  x: 1\n", "unknown experiment '51_nope'"),
])
def test_bad_parameter_files_are_one_line_errors(nbs, runs, tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    out = mmr("run", "50_ok", "-f", str(bad))
    assert out.returncode == 2 and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not runs.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_a_kernel_starts(nbs, runs):
    _notebook(nbs / "80_device.ipynb", "raise SystemExit('the kernel must not start')",
              params='device = "auto"\nrun_dir = None')
    out = mmr("run", "80_device", "--device", "cuda")
    assert out.returncode == 2 and "CUDA is not available" in out.stderr
    assert not runs.exists()


def test_reproduce_publishes_summary_and_figures_to_the_results_folder(nbs, runs, tmp_path):
    _notebook(nbs / "70_fig.ipynb", "import json, pathlib\nimport matplotlib\nmatplotlib.use('Agg')\n"
              "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([0, x])\n"
              "fig.savefig(pathlib.Path(run_dir, 'curve.png'))\n"
              "pathlib.Path(run_dir, 'metrics.json').write_text(json.dumps({'summary': {'acc': 0.5 * x}}))")
    results = tmp_path / "results"
    out = mmr("reproduce", "--only", "70_fig", "50_ok", "--results", str(results))
    assert out.returncode == 0, out.stderr
    summary = json.loads((results / "summary.json").read_text())
    assert list(summary["notebooks"]) == ["70_fig", "50_ok"]
    assert summary["notebooks"]["70_fig"]["summary"] == {"acc": 0.5}
    assert summary["notebooks"]["70_fig"]["figures"] == ["70_fig/curve.png"]
    assert (results / "70_fig" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["notebooks"]["50_ok"]["params"] == {"x": 1}  # every parameter, not the run folder
    record = json.loads((results / "reproduction.json").read_text())
    assert record["environment"]["torch"] and set(record["seconds"]) == {"70_fig", "50_ok"}
    assert oct((results / "summary.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    old = os.umask(0)
    os.umask(old)
    return old


def test_a_folder_holding_a_run_is_never_written_into(nbs, runs, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.json").write_text('{"mine": 1}')
    out = mmr("run", "50_ok", "--run-dir", str(used))
    assert out.returncode == 2 and "already holds a run" in out.stderr
    assert sorted(p.name for p in used.iterdir()) == ["metrics.json"]
    assert (used / "metrics.json").read_text() == '{"mine": 1}'


@pytest.mark.parametrize("name", ["reproduce.yaml", "reproduce-gpu.yaml", "reproduce-deep.yaml"])
def test_the_project_parameter_files_are_valid_for_the_experiments(name):
    from mm_research.core import project_root
    from mm_research.runner import load_param_files, runnable_notebooks
    path = project_root(Path(__file__).parent) / name
    per_nb = load_param_files([path], runnable_notebooks())
    assert all(ps["seeds"] == list(range(len(ps["seeds"]))) and len(ps["seeds"]) >= 3 for ps in per_nb.values())


def test_run_dir_parameter_is_the_run_folder(nbs, runs, tmp_path, capsys):
    chosen = tmp_path / "chosen"
    assert main(["run", "50_ok", "-p", "x", "4", "-p", "run_dir", str(chosen)]) == 0
    assert json.loads((chosen / "metrics.json").read_text()) == {"x_seen": 4}
    assert json.loads((chosen / "params.json").read_text())["run_dir"] == str(chosen.resolve())
    assert not runs.exists()


def test_two_runs_into_one_folder_exactly_one_proceeds(nbs, runs, tmp_path):
    both = tmp_path / "both"
    procs = [subprocess.Popen([*MMR, "run", "50_ok", "--run-dir", str(both)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in outs) == [0, 2], outs
    err = next(e for code, e in outs if code == 2)
    assert len(err.strip().splitlines()) == 1 and ("already holds a run" in err or "claimed by another" in err), err


def test_save_writes_a_preset_as_a_checkpoint(tmp_path, capsys):
    from mm_research.zoo import load_model
    folder = tmp_path / "eff"
    assert main(["save", "tiny-efficientnet", str(folder), "--seed", "3"]) == 0
    assert f"-p model {folder}" in capsys.readouterr().out
    assert {"config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    saved, preset = load_model(str(folder), device="cpu"), load_model("tiny-efficientnet", device="cpu", seed=3)
    a, b = saved.state_dict(), preset.state_dict()
    assert a.keys() == b.keys() and all(__import__("torch").equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("preset, message", [
    ("llava-1.5-7b", "'llava-1.5-7b' is a reference preset (no weights to write): give one of tiny-"),
    ("tiny-lava", "'tiny-lava' is no preset: give one of tiny-"),
])
def test_save_refuses_reference_and_unknown_presets(tmp_path, capsys, preset, message):
    assert main(["save", preset, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_save_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["save", "tiny-llava", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is not empty: give a new or empty folder" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"] and (tmp_path / "mine.txt").read_text() == "keep"

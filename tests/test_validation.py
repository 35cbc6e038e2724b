"""Every bad input to `mmr run` / `mmr reproduce` is one line naming the experiment, parameter, value and fix,
given before any kernel starts and before any folder is made."""
import json
import os

import papermill
import pytest
import torch

from mm_research.cli import main


@pytest.fixture
def no_kernel(runs, monkeypatch):
    "Fail loudly if a kernel would start; the private runs/ root must stay absent."
    def refuse(*args, **kwargs): raise AssertionError("a kernel was started")
    monkeypatch.setattr(papermill, "execute_notebook", refuse)
    yield runs
    assert not runs.exists(), "a run folder was made"


def refused(capsys, args, message):
    "Run `mmr args` in-process: exit code 2, one stderr line containing `message` (no kernel: see `no_kernel`)."
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err
    return err


def test_warm_up(no_kernel, capsys):  # the first call imports papermill and reads the notebooks
    refused(capsys, ["run", "21_pruning", "-p", "pruner", "bogus"], "pruner")


@pytest.mark.parametrize("nb, name, value, message", [
    ("21_pruning", "pruner", "bogus", "21_pruning: pruner='bogus' is not a known choice: give one of all, learned"),
    ("10_speech", "modes", "lora,bogus", "10_speech: modes='lora,bogus' has unknown item(s) bogus: use items of "
                                         "frozen, lora, full"),
    ("10_speech", "modes", ",", "modes=',' is empty: give at least one of frozen"),
    ("30_gated", "train_parts", "bogus", "30_gated: train_parts='bogus' is refused: train_parts ['bogus'] not "
                                         "allowed"),
    ("10_speech", "strategy", "fast", "strategy='fast' is not a known choice: give one of auto, audio_tower"),
    ("10_speech", "targets", "q,x", "targets='q,x' has unknown item(s) x"),
    ("03_memory", "optimizer", "lion", "optimizer='lion' is not a known choice: give one of adamw, adam"),
    ("03_memory", "dtype", "int8", "dtype='int8' is not a known choice"),
    ("03_memory", "phases", "['load', 'fly']", "phases=['load', 'fly'] has unknown item(s) fly"),
    ("03_memory", "tiny_presets", "['tiny-llava', 'llava-1.5-7b']", "has unknown item(s) llava-1.5-7b"),
    ("21_pruning", "position_policy", "shifted", "position_policy='shifted' is not a known choice"),
    ("21_pruning", "objective", "medium", "objective='medium' is not a known choice: give one of logmask, hard, soft"),
    ("21_pruning", "question_pool", "max", "question_pool='max' is not a known choice"),
    # numbers out of their declared range
    ("20_llava", "epochs", "-1", "20_llava: epochs=-1 is out of range: give a value >= 0"),
    ("20_llava", "batch_size", "0", "batch_size=0 is out of range: give a value >= 1"),
    ("20_llava", "n_test", "0", "n_test=0 is out of range: give a value >= 1"),
    ("20_llava", "lr", "0", "lr=0.0 is out of range: give a value > 0"),
    ("21_pruning", "keep_ratios", "[0.5, 0]", "keep_ratios=[0.5, 0] has item(s) [0] that are not numbers in (0, 1]"),
    ("21_pruning", "train_keep_ratios", "[0.5, 1.5]", "train_keep_ratios=[0.5, 1.5] is refused"),
    ("21_pruning", "scorer_train_share", "0", "scorer_train_share=0.0 is out of range: give a value in (0, 1]"),
    ("30_gated", "val_fraction", "1", "val_fraction=1.0 is out of range: give a value in (0, 1)"),
    ("30_gated", "seeds", "[]", "seeds=[] must be a non-empty list of ints >= 0"),
    ("30_gated", "seeds", "[0, 1.5]", "seeds=[0, 1.5] has item(s) [1.5] that are not ints >= 0"),
    ("10_speech", "lrs", "[0.1, -1]", "lrs=[0.1, -1] has item(s) [-1] that are not finite numbers > 0"),
    ("10_speech", "lrs", "[.inf]", "lrs=[inf] has item(s) [inf] that are not finite numbers > 0"),
    ("20_llava", "lr", ".inf", "20_llava: lr=inf is not a finite number: give a value > 0"),
    ("20_llava", "lr", ".nan", "lr=nan is not a finite number"),
    ("30_gated", "seeds", "[0, 0]", "30_gated: seeds=[0, 0] repeats [0]: each item counts once"),
    ("10_speech", "lrs", "[0.01, 0.01]", "lrs=[0.01, 0.01] repeats [0.01]"),
    ("10_speech", "threads", "0", "10_speech: threads=0 is out of range: give a value >= 1"),
    ("10_speech", "grad_accum", "0", "grad_accum=0 is out of range"),
])
def test_declared_choices_and_ranges(no_kernel, capsys, nb, name, value, message):
    refused(capsys, ["run", nb, "-p", name, value], message)


def test_paths_that_must_exist(no_kernel, capsys, tmp_path):
    missing = tmp_path / "no-such-folder"
    refused(capsys, ["run", "20_llava", "-p", "data_dir", str(missing)],
            f"20_llava: data_dir='{missing}' does not exist: give an existing path")
    refused(capsys, ["run", "30_gated", "-p", "style_checkpoint", str(missing)], "style_checkpoint=")
    refused(capsys, ["run", "30_gated", "-p", "model", str(missing)], "is no preset, existing path or hub id")
    refused(capsys, ["run", "20_llava", "-p", "model", "tiny-lava"], "did you mean tiny-llava?")
    assert not missing.exists()


def test_types_and_names(no_kernel, capsys):
    refused(capsys, ["run", "20_llava", "-p", "epochs", "two"], "20_llava: Parameter 'epochs' expects int")
    refused(capsys, ["run", "20_llava", "-p", "epoch", "2"], "20_llava has no parameter 'epoch'. Did you mean epochs")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda(no_kernel, capsys):
    refused(capsys, ["run", "30_gated", "--device", "cuda"], "CUDA is not available here: use device='auto' or 'cpu'")
    refused(capsys, ["run", "30_gated", "-p", "device", "cuda:0"], "CUDA is not available")


def test_parameter_files(no_kernel, capsys, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("20_llava:\n  epochs: 2\n21_pruning:\n  pruner: bogus\n")
    refused(capsys, ["run", "20_llava", "-f", str(f)], "21_pruning: pruner='bogus' is not a known choice")
    refused(capsys, ["reproduce", "-f", str(f)], "21_pruning: pruner='bogus'")
    f.write_text("20_llava:\n  epochs: 2\n  run_dir: /tmp/x\n")
    refused(capsys, ["reproduce", "-f", str(f)], "20_llava: run_dir is set by mmr reproduce")
    f.write_text("20_llava: {epochs: [1\n")
    refused(capsys, ["run", "20_llava", "-f", str(f)], "is not valid YAML at line")


def test_unwritable_run_folders(no_kernel, capsys, tmp_path, monkeypatch):
    refused(capsys, ["run", "20_llava", "--run-dir", "/sys/mmr-test-run"],
            "Cannot write the run folder /sys/mmr-test-run (Operation not permitted): give a writable --run-dir")
    refused(capsys, ["run", "20_llava", "-p", "run_dir", "/sys/mmr-test-run"], "Cannot write the run folder")
    monkeypatch.setenv("MMR_RUNS", "/sys/mmr-test-runs")
    refused(capsys, ["run", "20_llava"], "Cannot write the run folder /sys/mmr-test-runs/20_llava")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    monkeypatch.setenv("MMR_RUNS", str(a_file))
    refused(capsys, ["run", "20_llava"], f"Cannot write the run folder {a_file}/20_llava")
    assert a_file.read_text() == ""


def test_read_only_run_folder(no_kernel, capsys, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere: refuse writes under `ro` as the kernel does for other users
        real_open = os.open
        def refuse(path, *args, **kwargs):
            if str(path).startswith(str(ro)): raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)
        monkeypatch.setattr(os, "open", refuse)
    try: refused(capsys, ["run", "20_llava", "--run-dir", str(ro)], "Cannot write the run folder")
    finally: ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_two_run_folders_and_bad_resumes(no_kernel, capsys, tmp_path):
    refused(capsys, ["run", "20_llava", "-p", "run_dir", str(tmp_path / "a"), "--run-dir", str(tmp_path / "b")],
            "20_llava: two run folders given")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(capsys, ["run", "20_llava", "--resume", str(empty)], "it has no params.json, so it is no run folder")
    other = tmp_path / "other"
    other.mkdir()
    (other / "params.json").write_text(json.dumps({"epochs": 1}))
    (other / ".mmr_run.json").write_text(json.dumps({"notebook": "30_gated"}))
    refused(capsys, ["run", "20_llava", "--resume", str(other)],
            f"holds a run of 30_gated: use `mmr run 30_gated --resume {other}`")
    refused(capsys, ["run", "30_gated", "--resume", str(other), "-p", "epochs", "3"],
            "30_gated: --resume keeps the recorded parameters and")
    refused(capsys, ["run", "30_gated", "--resume", str(other), "--run-dir", str(empty)], "runs in that folder")
    assert sorted(p.name for p in other.iterdir()) == [".mmr_run.json", "params.json"]


@pytest.mark.parametrize("nb, extra, message", [
    ("20_llava", [], "matches no VQA layout for split 'train': expected train.csv"),
    ("20_llava", ["-p", "epochs", "0"], "matches no VQA layout for split 'test'"),
    ("10_speech", [], "holds no label folders of .wav files"),
    ("30_gated", [], "train.csv"),
])
def test_data_dir_without_the_experiments_layout(no_kernel, capsys, tmp_path, nb, extra, message):
    empty = tmp_path / "my-data"
    empty.mkdir()
    err = refused(capsys, ["run", nb, "-p", "data_dir", str(empty), *extra], message)
    assert f"{nb}: data_dir='{empty}'" in err
    assert list(empty.iterdir()) == []

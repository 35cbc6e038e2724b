"Spoken-command data: synthesis through espeakng-loader, caching, determinism, and the real-data loader's errors."
import csv, hashlib, os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from dataclasses import asdict
from itertools import combinations
from pathlib import Path
import numpy as np, pytest
from scipy.io import wavfile
from mm_research.speech.data import (SpokenCommandsConfig, spoken_commands, load_audio_folder, read_wav, check_voice,
                                     COMMAND_WORDS, SAMPLE_RATE, VOICE_SPLITS)
from mm_research.zoo import VOCAB_WORDS

SMALL = SpokenCommandsConfig(words=("stop", "go", "left"),
                             voices={"train": ("en+m1", "en-us+f1"), "test": ("en-gb-x-rp+f2",)},
                             rates=(140, 200), pitches=(40,))


def small(**changes) -> SpokenCommandsConfig:
    return SpokenCommandsConfig(**{**asdict(SMALL), **changes})


def test_words_voices_and_split(tmp_path):
    assert len(COMMAND_WORDS) >= 10 and set(COMMAND_WORDS) <= set(VOCAB_WORDS)
    sc = spoken_commands(SMALL, cache=tmp_path)
    assert {k: len(v) for k, v in sc.items()} == {"train": 12, "test": 6}
    assert {m["voice"] for m in sc["test"].meta} == {"en-gb-x-rp+f2"}
    assert not {m["voice"] for m in sc["train"].meta} & {m["voice"] for m in sc["test"].meta}
    assert [sc["train"].labels[t] for t in sc["train"].targets[:3]] == ["stop", "stop", "go"]
    for a in sc["train"].audio:
        assert a.dtype == np.float32 and a.ndim == 1 and 0.15 * SAMPLE_RATE < len(a) < 2 * SAMPLE_RATE


def test_default_splits_have_disjoint_voices():
    "Training, validation (selection) and test voices: three splits, no voice in two of them."
    assert set(VOICE_SPLITS) == {"train", "val", "test"} and all(VOICE_SPLITS.values())
    for a, b in combinations(VOICE_SPLITS, 2): assert not set(VOICE_SPLITS[a]) & set(VOICE_SPLITS[b]), (a, b)


def test_seed_redraws_noise_of_the_same_clips(tmp_path):
    "A seed gives every clip its own noise, gain and onset; the words, voices and splits stay; no test clip elsewhere."
    voices = {"train": ("en+m1",), "val": ("en-us+f1",), "test": ("en-gb-x-rp+f2",)}
    a = spoken_commands(small(voices=voices), cache=tmp_path)
    b = spoken_commands(small(voices=voices, seed=1), cache=tmp_path)
    assert set(a) == set(b) == {"train", "val", "test"}
    for s in a:
        assert a[s].meta == b[s].meta and a[s].targets == b[s].targets
        assert all(not np.array_equal(x, y) for x, y in zip(a[s].audio, b[s].audio))
    digests = {s: {hashlib.sha256(x.tobytes()).hexdigest() for x in c.audio} for s, c in a.items()}
    assert not digests["test"] & (digests["train"] | digests["val"])


def test_cached_and_deterministic(tmp_path):
    a = spoken_commands(SMALL, cache=tmp_path / "a")
    folder = next((tmp_path / "a/spoken_commands").iterdir())
    mtime = (folder / "train/train.csv").stat().st_mtime_ns
    a2 = spoken_commands(SMALL, cache=tmp_path / "a")
    assert (folder / "train/train.csv").stat().st_mtime_ns == mtime        # read back, not rebuilt
    b = spoken_commands(SMALL, cache=tmp_path / "b")
    for s in a:
        assert [x.tobytes() for x in a[s].audio] == [x.tobytes() for x in b[s].audio]
        assert [x.tobytes() for x in a[s].audio] == [x.tobytes() for x in a2[s].audio]
    quiet = spoken_commands(small(noise_snr_db=None), cache=tmp_path / "a")
    assert not np.array_equal(quiet["train"].audio[0], a["train"].audio[0])


def test_noise_level_follows_snr(tmp_path):
    clean = spoken_commands(small(noise_snr_db=None, max_onset_s=0.1), cache=tmp_path)
    noisy = spoken_commands(small(noise_snr_db=10.0, max_onset_s=0.1), cache=tmp_path)
    c, n = clean["train"].audio[0], noisy["train"].audio[0]
    noise = n - c
    snr = 10 * np.log10(np.mean(c[c != 0] ** 2) / np.mean(noise ** 2))
    assert 8 < snr < 12, snr


def test_bad_voices(tmp_path):
    with pytest.raises(ValueError, match="no voice variant 'zz'"): check_voice("en-us+zz")
    with pytest.raises(ValueError, match="in both"):
        spoken_commands(SpokenCommandsConfig(voices={"train": ("en+m1",), "test": ("en+m1",)}), cache=tmp_path)


def test_real_layout_folder_and_csv(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("go", "stop"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(2):
            samples = (rng.standard_normal(44100) * 1000).astype(np.int16)
            wavfile.write(tmp_path / "data" / label / f"{i}.wav", 44100, samples)
    clips = load_audio_folder(tmp_path / "data")
    assert clips.labels == ["go", "stop"] and clips.targets == [0, 0, 1, 1]
    assert all(len(a) == SAMPLE_RATE for a in clips.audio)
    with open(tmp_path / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([["data/go/0.wav", "go"], ["data/stop/1.wav", "stop"]])
    clips = load_audio_folder(tmp_path / "data.csv", labels=["stop", "go"])
    assert clips.targets == [1, 0]
    np.testing.assert_array_equal(clips.audio[0], read_wav(tmp_path / "data/go/0.wav"))


def test_real_layout_errors_list_offenders(tmp_path):
    (tmp_path / "d/yes").mkdir(parents=True)
    for i in range(7): (tmp_path / f"d/yes/bad{i}.wav").write_bytes(b"not a wav")
    with pytest.raises(ValueError, match=r"7 unreadable audio file\(s\), first: .*bad0.wav"):
        load_audio_folder(tmp_path / "d")
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"gone{i}.wav,yes\n" for i in range(9)))
    with pytest.raises(FileNotFoundError, match=r"9 missing audio file\(s\), first: .*gone0.wav.*gone4.wav") as e:
        load_audio_folder(tmp_path / "m.csv")
    assert "gone5.wav" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="one sub-folder of .wav files per label"):
        load_audio_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="not in the given labels"):
        wavfile.write(tmp_path / "ok.wav", 16000, np.zeros(100, np.float32) + .1)
        (tmp_path / "l.csv").write_text("path,label\nok.wav,maybe\n")
        load_audio_folder(tmp_path / "l.csv", labels=["yes"])

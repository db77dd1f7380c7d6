"""Speech Commands (Warden 2018) as MFCC series for the Neural CDE (Kidger et al. 2020 setup).

The set is 1-second 16 kHz recordings of spoken words in one folder per word
(``<root>/<word>/*.wav``, the layout of the v0.02 archive). As in Kidger et al., the ten
words yes/no/up/down/left/right/on/off/stop/go are kept, recordings shorter than one second
are skipped, and each recording becomes 20 mel-frequency cepstral coefficients on 161
frames (``n_fft=200``, hop 100, 64 mel bands, log of mel power + 1e-6, orthonormal DCT-II:
torchaudio's ``MFCC(log_mels=True, n_mfcc=20, melkwargs=dict(n_fft=200, n_mels=64))``
recipe, computed here with ``torch.stft`` so that torchaudio is not needed).

Nothing is downloaded unless ``download=True`` (2.3 GB from download.tensorflow.org).
"""

from __future__ import annotations

import math
import tarfile
import urllib.request
import wave
from pathlib import Path

import numpy as np
import torch

from nde_zoo.datamodules.timeseries import SeriesDataModule

__all__ = ["SpeechCommandsDataModule", "read_wav", "mfcc", "WORDS"]

WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
ARCHIVE_URL = "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
SAMPLE_RATE = 16000


def read_wav(path: str | Path) -> np.ndarray:
    """A mono 16-bit PCM wav file as float samples in ``[-1, 1]``; errors name the file."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as handle:
            channels, width, rate = handle.getnchannels(), handle.getsampwidth(), handle.getframerate()
            frames = handle.readframes(handle.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a readable wav file ({exc})") from None
    if channels != 1 or width != 2:
        raise ValueError(
            f"{path}: expected mono 16-bit PCM, got {channels} channel(s) of {8 * width}-bit samples"
        )
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: expected a {SAMPLE_RATE} Hz sample rate, got {rate} Hz")
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0


def _mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """Triangular HTK-mel filters ``(n_freqs, n_mels)`` from 0 Hz to Nyquist (no area normalisation)."""

    def to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    freqs = np.linspace(0, sample_rate / 2, n_freqs)
    mel_points = np.linspace(to_mel(np.array(0.0)), to_mel(np.array(sample_rate / 2)), n_mels + 2)
    hz_points = 700.0 * (10 ** (mel_points / 2595.0) - 1.0)
    diff = np.diff(hz_points)
    slopes = hz_points[None, :] - freqs[:, None]  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    return torch.from_numpy(np.maximum(0.0, np.minimum(down, up)).astype(np.float32))


def _dct_matrix(n_mfcc: int, n_mels: int) -> torch.Tensor:
    """Orthonormal DCT-II ``(n_mels, n_mfcc)``."""
    n = np.arange(n_mels)
    k = np.arange(n_mfcc)
    dct = np.cos(math.pi / n_mels * (n[:, None] + 0.5) * k[None, :]) * math.sqrt(2.0 / n_mels)
    dct[:, 0] *= 1.0 / math.sqrt(2.0)
    return torch.from_numpy(dct.astype(np.float32))


def mfcc(audio: torch.Tensor, n_mfcc: int = 20, n_fft: int = 200, n_mels: int = 64) -> torch.Tensor:
    """MFCCs of ``audio`` ``(batch, samples)`` -> ``(batch, frames, n_mfcc)`` (161 frames per second)."""
    window = torch.hann_window(n_fft)
    spec = (
        torch.stft(
            audio,
            n_fft,
            hop_length=n_fft // 2,
            window=window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        .abs()
        .pow(2)
    )  # (batch, n_fft // 2 + 1, frames)
    mel = torch.einsum("bft,fm->btm", spec, _mel_filterbank(n_fft // 2 + 1, n_mels, SAMPLE_RATE))
    return torch.log(mel + 1e-6) @ _dct_matrix(n_mfcc, n_mels)


class SpeechCommandsDataModule(SeriesDataModule):
    """Ten spoken words as 20-channel MFCC series of 161 frames (10 classes).

    Args:
        root: the folder holding one sub-folder of wav files per word.
        download: fetch and unpack the v0.02 archive into ``root`` when it is missing (2.3 GB).
        words: the words (classes) to keep.
        n_mfcc: cepstral coefficients per frame.
        batch_size / val_fraction / test_fraction / missing_rate / intensity / seed: see
            :class:`~nde_zoo.datamodules.timeseries.SeriesDataModule` (a fixed random split).
    """

    def __init__(
        self,
        root: str = "data/speech_commands",
        download: bool = False,
        words: list[str] | tuple[str, ...] = WORDS,
        n_mfcc: int = 20,
        batch_size: int = 32,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        missing_rate: float = 0.0,
        intensity: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, missing_rate, intensity, seed)
        self.root = Path(root)
        self.download = download
        self.words = tuple(words)
        self.n_mfcc = n_mfcc

    def prepare_data(self) -> None:
        missing = [w for w in self.words if not (self.root / w).is_dir()]
        if not missing:
            return
        if not self.download:
            raise FileNotFoundError(
                f"Speech Commands folders {missing} not found under {self.root}; pass data.download=true "
                "(2.3 GB, needs a network) or unpack speech_commands_v0.02.tar.gz there, or use "
                "data=japanese_vowels (embedded, no download)"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        archive = self.root / "speech_commands_v0.02.tar.gz"
        urllib.request.urlretrieve(ARCHIVE_URL, archive)
        with tarfile.open(archive) as tar:
            tar.extractall(self.root, filter="data")

    def load(self):
        self.prepare_data()
        audio, labels = [], []
        for word in self.words:
            for path in sorted((self.root / word).glob("*.wav")):
                samples = read_wav(path)
                if len(samples) != SAMPLE_RATE:  # Kidger et al. keep the full-second recordings only
                    continue
                audio.append(samples)
                labels.append(word)
        if not audio:
            raise ValueError(f"no one-second recordings of {list(self.words)} under {self.root}")
        features = []
        for start in range(0, len(audio), 512):
            batch = torch.from_numpy(np.stack(audio[start : start + 512]))
            features.append(mfcc(batch, n_mfcc=self.n_mfcc).double().numpy())
        series = list(np.concatenate(features))
        return series, labels, None, None

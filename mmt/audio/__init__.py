"""Audio features computed with torch ops (no torchaudio)."""

from mmt.audio.melspec import LogMelSpectrogram, mel_filterbank

__all__ = ["LogMelSpectrogram", "mel_filterbank"]

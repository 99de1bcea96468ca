"""The audio every pipeline emits (reference, server, clients): 24 kHz mono, 16-bit little-endian PCM.

No torch here: the HTTP workers and the clients import it."""
from __future__ import annotations

import struct
from typing import Optional

import numpy as np

SAMPLE_RATE = 24000   # HiFT's output rate (50 mel frames/s x 480 samples/frame)


def pcm16_bytes(audio: np.ndarray) -> bytes:
    """float [-1, 1] -> little-endian int16 bytes (the wire and WAV format)."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_header(data_bytes: Optional[int]) -> bytes:
    """RIFF header of 24 kHz mono PCM16; unknown length (streaming) writes the maximum sizes."""
    size = 0xFFFFFFFF - 36 if data_bytes is None else data_bytes
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", min(36 + size, 0xFFFFFFFF), b"WAVE", b"fmt ", 16, 1, 1,
                       SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16, b"data", size)

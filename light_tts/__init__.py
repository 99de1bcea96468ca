"""LightTTS: a multi-process CosyVoice2 text-to-speech server."""

__version__ = "0.1.0"

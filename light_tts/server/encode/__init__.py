"""The encode stage process (process.py): text and prompt audio in, LLM requests out; its engine is light_tts.frontend."""

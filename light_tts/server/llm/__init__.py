"""Insides of the LLM stage process (light_tts.server.llm.process)."""

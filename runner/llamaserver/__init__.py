"""A llama-server compatible front end (and OpenAI-compatible server) over the shared engine."""

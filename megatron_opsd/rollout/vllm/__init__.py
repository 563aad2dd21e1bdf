"""vLLM servers as the rollout engine: the OpenAI-compatible server with its RL control endpoints."""

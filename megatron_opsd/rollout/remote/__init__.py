"""What the engines over inference-server fleets share (SGLang's, vLLM's): HTTP endpoints whose
errors name the URL and the call, server processes started or adopted and brought back when they
die, and the engine skeleton: one request per sample, retried until exactly one complete reply,
servers paused, loaded and resumed one by one for a weight sync."""

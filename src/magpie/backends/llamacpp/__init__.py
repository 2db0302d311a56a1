"""llama.cpp in process (llama-cpp-python): the plain ``model`` backend and
the continuous-batching ``batch`` backend (the embedded default)."""

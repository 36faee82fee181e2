"""Code shared by the edge agent and the verifier: wire protocol, model registry, byte alignment.

Nothing here imports llama-cpp-python, torch or a web framework at import time, so every role can
depend on it.
"""

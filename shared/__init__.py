"""Code shared by the edge agent and the verifier: wire protocol, model registry, byte alignment.

Only ``llama_tokenizer`` imports llama-cpp-python; nothing else here imports it, torch or a web
framework, so a board, the verifier and a remote engine front-end can all depend on the rest.
"""

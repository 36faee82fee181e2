"""The llama.cpp runner: one model, ``n_seq_max`` KV sequences, a batching scheduler.

Everything that knows about KV slots, rollback, parking, forward passes and the cost curve lives
here; only ``backend`` imports llama-cpp-python.
"""

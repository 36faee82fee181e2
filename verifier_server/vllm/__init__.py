"""The vLLM runner: the verifier's rounds as requests to vLLM's async engine (paged KV, continuous
batching, prefix caching, tensor and pipeline parallelism), for GPU servers and targets beyond one
GPU. Installed by ``scripts/setup-vllm.sh`` in its own environment; nothing else imports vLLM.
"""

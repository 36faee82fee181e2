"""``sled-bench``: how many devices one verifier serves, measured with real processes.

A real verifier process and N real agent processes run on loopback; the benchmark reads the
verifier's own CPU time from the OS and its forward-pass counters from ``/v1/stats``, checks every
output against a plain greedy reference, and replays the recorded forward passes through a roofline
model of a datacenter GPU. See ``bench/README.md``.
"""

"""Benchmarks of the pipeline against the per-event approach and the machine's limits.

`python benchmarks/run.py --help`. The orchestrator (`run.py`) generates the workload,
serves it over a loopback WebSocket (`server.py`) and runs each consumer
(`consumer.py`) in a child process of its own, then verifies every database it wrote.
"""

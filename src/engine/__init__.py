"""The rollout engine: code that runs inside Ray actors started from the engine PEX.

It may import the engine resolve (vLLM, JAX, libtpu, torch, transformers); the driver never imports it.
"""

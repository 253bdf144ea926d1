"""Routing policy, pure: backend state, the chooser, retry backoff and budget, circuit breakers.

No I/O and no HTTP types here: callers pass the time (`now`) and plain data, so every rule is unit
tested without a network, and the gateway and the Ray Serve router share one implementation.
"""

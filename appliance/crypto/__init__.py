"""The hazmat layer: pure functions, no I/O, randomness passed in.

Nothing under ``appliance.crypto`` imports protocols, networking or trio.
"""

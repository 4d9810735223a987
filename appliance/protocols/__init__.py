"""Sans-IO protocol state machines for the paper's Tables 1-3.

Nothing here reads a clock, touches a socket or draws randomness by itself: time
arrives as ``now`` arguments, randomness as sources passed in, and every protocol
object returns the messages it wants sent. The trio server and the deterministic
simulator drive the same objects.
"""

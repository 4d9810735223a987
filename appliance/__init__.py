"""Proactive Security Toolkit appliance: a secure-logging and timestamping appliance.

n PServers jointly hold the group's keys as threshold shares, refresh them every
period and heal servers that were broken into (Barak, Herzberg, Naor, Shai, CCS '99).
"""

__version__ = "0.1.0"

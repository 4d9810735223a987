"""Deterministic simulation: n sans-IO servers in one process over a seeded network."""

from appliance.sim._net import Fault, NetworkConfig, SimNode, Simulation

__all__ = ["Fault", "NetworkConfig", "SimNode", "Simulation"]

"""Agentic tool use: agent records, the tool worker process and multi-turn tool-using trajectories."""

"""The CPU host agent: runs python and exec functions, keeps warm instances, heartbeats its load."""

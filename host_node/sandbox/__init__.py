"""Secure sandboxes from sharded pools of pre-created cgroups (DESIGN.md §4)."""

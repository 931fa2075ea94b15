"""Secure sandboxes from sharded pools of pre-created cgroups (docs/architecture.md §4)."""

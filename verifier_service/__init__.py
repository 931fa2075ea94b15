"""The verifier service: checks tenant eBPF programs and signs what it approves (docs/architecture.md §5)."""

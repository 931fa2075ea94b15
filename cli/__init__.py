"""The `hetfaas` command and the Python client it, the tests and the benchmarks use."""

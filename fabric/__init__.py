"""Shared plumbing: NATS serving and requests, the etcd store, bundles, tracing, settings, tasks."""

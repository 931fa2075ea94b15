"""Installing and starting the real services: nats-server, etcd, and the local cluster launcher."""

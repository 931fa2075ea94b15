"""Function runtimes. Each starts its processes through a `Spawner`, so sandboxes can replace it."""

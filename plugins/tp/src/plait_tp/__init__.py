"""plait tensor parallelism: shards a model by its spec's TP plan (see README.md)."""

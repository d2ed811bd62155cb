"""The per-node agent: probes (GPU, host, trainer reports), evidence, heartbeats and Prometheus metrics."""

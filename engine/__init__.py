"""vqim runtime: configs, weight loading, models, KV-cached generation and the Engine API."""

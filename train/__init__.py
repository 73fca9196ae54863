"""vqim reference training stack (losses, optimizers, loops, export to the engine format)."""

"""Making models smaller and faster: quantization (pruning and distillation follow)."""

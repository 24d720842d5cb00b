"""Making models smaller and faster: weight quantization (and, later, pruning and distillation)."""

"""What every PEFT method shares: configs, registry, targeting, the layer wrapper, the model, I/O."""

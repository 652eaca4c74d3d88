"""Models: device selection, the Encoder over any HF checkpoint, tiny offline checkpoints."""

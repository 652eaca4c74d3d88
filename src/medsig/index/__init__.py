"""medsig.index."""

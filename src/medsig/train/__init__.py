"""medsig.train."""

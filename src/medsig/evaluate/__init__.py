"""medsig.evaluate."""

"""medsig.serve."""

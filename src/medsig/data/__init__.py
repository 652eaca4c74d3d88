"""medsig.data."""

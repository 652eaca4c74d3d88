"""medsig.evaluate."""

TASKS = ("classification", "retrieval", "zeroshot", "clustering")  # light: the CLI's default

"""Pure metric functions, one module per task (checked against sklearn / brute force).

Below train and evaluate: training validation and the evaluation report compute every
metric with the same function."""

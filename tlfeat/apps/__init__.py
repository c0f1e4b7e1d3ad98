"""What users run on fitted heads and runs: predict, evaluate, compare, the demo."""

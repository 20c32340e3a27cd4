"""Training module (issue: training). Empty until the trainer lands."""

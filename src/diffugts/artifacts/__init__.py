"""What the stages exchange: the study and its geometry, and each stage's artifact."""

"""What runs the stages over studies: one study (segment), a cohort, an evaluation."""

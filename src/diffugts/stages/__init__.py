"""The pipeline's stages, in order: ingest -> attend -> synthesize -> refine -> report."""

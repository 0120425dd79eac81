"""The pipeline: `build` chains the stages (ingest -> ... -> packaging) for one model and target."""

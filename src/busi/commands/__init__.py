"""Commands outside the pipeline: predict, ablate, report, check-metrics."""

"""Evaluation: metrics as pure functions, post-processing decided on validation, figures."""

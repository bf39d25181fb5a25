"""The model: the network factory, training checkpoints, and the predictor (networks + post-processing) that
evaluate, predict and serving all apply."""

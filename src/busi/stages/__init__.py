"""One module per DVC stage (dvc.yaml): fetch → merge_masks → split → preprocess → train → evaluate."""

"""Lesion segmentation and classification on breast ultrasound (BUSI), as a DVC + MLflow pipeline."""

CLASSES = ("benign", "malignant", "normal")  # label index = position in this tuple
SPLITS = ("train", "val", "test")


class BusiError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits non-zero."""

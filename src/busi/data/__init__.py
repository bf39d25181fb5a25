"""Data: the BUSI folder layout and its checks, the copy detector, the preprocessed arrays and augmentation."""

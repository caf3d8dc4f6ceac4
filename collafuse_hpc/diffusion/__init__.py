"""The science, with no I/O and no communication: the DDPM math (gaussian.py), the
split at the cut (split.py), the models (unet.py, trainable.py)."""

"""Scoring a trained run: image quality (features, FID/KID), disclosure of x_c and by
attack, client compute."""

"""Reconstruction methods that need no training: zero-filled SENSE and compressed sensing."""

from cvxmri.recon.classical import CLASSICAL_METHODS, CSConfig, cs_l1_wavelet, zero_filled_sense

__all__ = ["CLASSICAL_METHODS", "CSConfig", "cs_l1_wavelet", "zero_filled_sense"]

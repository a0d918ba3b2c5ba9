"""Reusable loss pieces. The method-specific combination of them lives in each train_<method>.py."""
from .kd import kd_loss, sigmoid_rampup

__all__ = ["kd_loss", "sigmoid_rampup"]

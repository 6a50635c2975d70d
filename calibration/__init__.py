"""Calibration data: dataset readers, preprocessing and range estimators. Needs only numpy and Pillow."""

from calibration.errors import DataError
from calibration.preprocess import Preprocess
from calibration.readers import ImageDataset, open_dataset

__all__ = ["DataError", "ImageDataset", "Preprocess", "open_dataset"]

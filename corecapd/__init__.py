"""corecap: keep Python / TensorFlow jobs inside their CPU core budget."""

__version__ = "0.1.0"

"""cotrain: train one model together over the internet with people you do not trust."""

__version__ = "0.1.0"

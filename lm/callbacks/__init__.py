from lm.callbacks.report import FitReport
from lm.callbacks.throughput import Throughput

__all__ = ["FitReport", "Throughput"]

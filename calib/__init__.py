"""build-engine calibration room: data sources, collector, observers, range methods, range tables.

Stage: calibrate() -> RangeTable. Imports stay lean: no torch, tensorrt or triton at import time.
"""

__all__: list[str] = []

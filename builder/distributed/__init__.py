"""Scale-out room: the library pipeline on a Ray cluster (optional ``[ray]`` extra, imported lazily).

Calibration shards reduced by exact Statistics merges (``ray_calibrate``) and the build matrix routed by Ray
resources (``sweep``). Without Ray the same functions run in-process; nothing here schedules work itself.
"""

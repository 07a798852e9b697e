"""CLI edge of build-engine: argument parsing, paths, progress bars and exit codes (calib/errors.py)."""

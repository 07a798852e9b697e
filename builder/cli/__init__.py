"""CLI edge of build-engine: argument parsing, paths, progress bars and exit codes (DESIGN.md section 7)."""

"""build-engine builder room: graph intake and analysis, recipes, planning, lowering, engine backends,
manifests, Triton export, profiling, evaluation and the CLI.

The only room that imports TensorRT (lazily). ``import builder`` loads no torch, tensorrt or triton.
"""

__version__ = "0.1.0"

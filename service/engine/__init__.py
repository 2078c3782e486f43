"""The engine: ahead-of-time compiled forward passes over a grid of shapes, and packing sequences into them.

A batch is `rows` rows of `length` tokens (a *bucket*, buckets.py). Short sequences are packed several to a
row (packing.py), so padding is only what is left at the end of rows. A batch is only ever run through an
already compiled bucket: a compiled executable refuses any other shape, so nothing can compile while serving.
Programs are shared by every model of one backbone shape (programs.py), compiled ahead of time
(compiling.py), and their measured run times kept beside the compilation cache (costs.py). A ModelRunner
(runner.py) is one model on top of them.

With several local devices the rows of a batch are split across them (data parallel), parameters
replicated.
"""

from .buckets import Bucket, bucket_grid, covering_buckets, default_single_row_lengths
from .compiling import BACKGROUND_NICE, complete_grids, release_memory
from .packing import MAX_SEQUENCES_PER_ROW, MIN_SEQUENCE, PackedBatch, Packer, Plan, sequences_per_row
from .programs import MAX_MASK_CHUNK, PROGRAMS, ProgramSet, backbone_signature, program_sets
from .runner import ModelRunner

__all__ = [
    "BACKGROUND_NICE",
    "MAX_MASK_CHUNK",
    "MAX_SEQUENCES_PER_ROW",
    "MIN_SEQUENCE",
    "PROGRAMS",
    "Bucket",
    "ModelRunner",
    "PackedBatch",
    "Packer",
    "Plan",
    "ProgramSet",
    "backbone_signature",
    "bucket_grid",
    "complete_grids",
    "covering_buckets",
    "default_single_row_lengths",
    "program_sets",
    "release_memory",
    "sequences_per_row",
]

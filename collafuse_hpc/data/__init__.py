"""Client data: the HDF5 shard format and reader (shard.py), dataset parsers
(sources.py), partition rules (partition.py) and the preparation pipeline
(prepare.py)."""

from collafuse_hpc.data.shard import (
    EpochSampler,
    ShardInfo,
    ShardReader,
    Split,
    inspect_shard,
    random_hflip,
    to_model_range,
    to_uint8,
    write_shard,
)

__all__ = [
    "EpochSampler",
    "ShardInfo",
    "ShardReader",
    "Split",
    "inspect_shard",
    "random_hflip",
    "to_model_range",
    "to_uint8",
    "write_shard",
]

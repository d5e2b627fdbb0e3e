"""hlip.shards: the study-shard dataset format (docs/shard-format.md).

* :mod:`hlip.shards.format`: Study/Scan data model, version, conventions, validation;
* :mod:`hlip.shards.writer`: ``encode_study``, ``DatasetWriter``, ``write_dataset``;
* :mod:`hlip.shards.reader`: ``ShardDataset`` (random access by key), ``decode_study``;
* :mod:`hlip.shards.stream`: ``stream_studies`` (webdataset, exact over ranks x workers);
* :mod:`hlip.shards.inspect`: listing, statistics, montages, verification, NIfTI export;
* :mod:`hlip.shards.synthetic`: phantom CT studies for tests and benchmarks.

Submodules are imported explicitly so that ``hlip.shards.format`` stays light (no torch).
"""

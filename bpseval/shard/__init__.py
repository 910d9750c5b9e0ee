"""The HDF5 shard format v1: its names and constants, the writer, and the validating reader."""

"""dchag: Distributed Cross-Channel Hierarchical Aggregation (D-CHAG) on megatron-core + DeepSpeed."""

__version__ = "0.1.0"

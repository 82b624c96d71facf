"""dchag: Distributed Cross-Channel Hierarchical Aggregation (D-CHAG) on megatron-core + DeepSpeed."""

__version__ = "0.1.0"


def load_pretrained(path, device=None, **kwargs):
    """A consolidated export (tools/convert_checkpoint.py --format consolidated) as a model in
    this process, normalization attached: see :mod:`dchag.inference.pretrained`."""
    from dchag.inference.pretrained import load_pretrained as _load
    return _load(path, device=device, **kwargs)

"""The trained model outside the cluster: load a consolidated export in one process and run it
on raw arrays (:func:`load_pretrained`), and predict over whole files (:mod:`dchag.inference.predict`)."""

from dchag.inference.pretrained import PretrainedDChag, load_pretrained

__all__ = ["PretrainedDChag", "load_pretrained"]

"""vdistill: video dataset distillation by static-dynamic disentanglement, on Ray."""

__version__ = "0.1.0"


def load_distilled(uri: str, storage=None, **kwargs):
    """Open an exported distilled set as a torch Dataset (see `vdistill.export.load_distilled`).

    A wrapper so `import vdistill` stays cheap: torch is imported on first use.
    """
    from vdistill.export import load_distilled as _load_distilled

    return _load_distilled(uri, storage, **kwargs)

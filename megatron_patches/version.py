"""Version guard: every patch here was written against these megatron-core releases (the one
place the supported versions are named; every patch module checks through it)."""

SUPPORTED_PREFIXES = ("0.16.",)


def require_megatron(patches: str = "megatron_patches/") -> None:
    """Refuse a megatron-core the patches were not written for. ``patches``: the file (or folder)
    whose upstream lines must be re-checked before a new release is allowed."""
    import megatron.core
    version = megatron.core.__version__
    if not version.startswith(SUPPORTED_PREFIXES):
        raise RuntimeError(
            f"megatron-core {version} is not supported by {patches} (written for "
            f"{', '.join(p + 'x' for p in SUPPORTED_PREFIXES)}); install megatron-core==0.16.1, "
            f"or re-check every patched upstream line listed in {patches} against the new release before adding "
            "it to SUPPORTED_PREFIXES in megatron_patches/version.py.")

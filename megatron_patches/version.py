"""Version guard: every patch here was written against these megatron-core releases."""

import megatron.core

SUPPORTED_PREFIXES = ("0.16.",)


def require_megatron() -> None:
    version = megatron.core.__version__
    if not version.startswith(SUPPORTED_PREFIXES):
        raise RuntimeError(
            f"megatron-core {version} is not supported by megatron_patches (written for "
            f"{', '.join(p + 'x' for p in SUPPORTED_PREFIXES)}); install megatron-core==0.16.1 "
            "or review the patches in megatron_patches/ against the new release.")

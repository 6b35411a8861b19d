"""Installed versions, for what a run writes (the manifest, the model card): one helper."""
from __future__ import annotations

import platform
from importlib import metadata


def package_versions(names) -> dict[str, str]:
    """{"python": ..., name: version} for each installed distribution of `names`; a package that
    is not installed (a source tree run without pip install) is left out."""
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found

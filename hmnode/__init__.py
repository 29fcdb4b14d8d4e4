"""hmnode: the peer-to-peer node agent of a compute-sharing mesh."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout the subpackages (transport/, consensus/, cli/, simnet/) sit beside this
# folder rather than inside it, as pyproject maps them at install time. When this package is
# imported straight from a checkout (`python -m hmnode` or `python -m pytest` in a clone put the
# clone first on sys.path), look for them there too, so the checkout imports as one tree.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "transport").is_dir() and (_checkout / "transport" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # type: ignore[name-defined]  # noqa: F821

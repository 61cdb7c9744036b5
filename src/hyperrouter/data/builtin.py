"""The built-in corpus: tiny Shakespeare, so `hyperrouter train` works offline out of the box.

What it is: Andrej Karpathy's char-rnn `data/tinyshakespeare/input.txt`, 1,115,394 bytes, 40,000
lines of concatenated Shakespeare plays (65 distinct characters), sha256
86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed. Shakespeare's text is public
domain; char-rnn is MIT licensed. It ships xz-compressed inside the package
(assets/tinyshakespeare.txt.xz, 364 KB), is verified on every load, and is split 90/5/5 by bytes
like any single-file character corpus.
"""

from __future__ import annotations

import hashlib
import lzma
from importlib import resources

from hyperrouter.errors import HyperRouterError

NAME = "tinyshakespeare (built-in)"
SIZE = 1_115_394
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def builtin_corpus_bytes() -> bytes:
    """The built-in corpus text, checked against its published size and sha256."""
    asset = resources.files("hyperrouter") / "data" / "assets" / "tinyshakespeare.txt.xz"
    try:
        data = lzma.decompress(asset.read_bytes())
    except (OSError, lzma.LZMAError) as err:
        raise HyperRouterError(f"the built-in corpus asset is missing or corrupt ({err})") from None
    if len(data) != SIZE or hashlib.sha256(data).hexdigest() != SHA256:
        raise HyperRouterError("the built-in corpus asset is corrupt (sha256 mismatch); reinstall")
    return data

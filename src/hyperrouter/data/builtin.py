"""The built-in corpus: tiny Shakespeare, so `hyperrouter train` works offline out of the box.

What it is: `data/tinyshakespeare/input.txt` of Andrej Karpathy's char-rnn
(github.com/karpathy/char-rnn, git blob 7dcb3a2d4cc3b48b6283dd46870bfeb78f88aac9): 1,115,394 bytes,
40,000 lines of concatenated Shakespeare plays, 65 distinct characters (all ASCII), sha256
86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed. Shakespeare's text is in the
public domain; char-rnn is MIT licensed.

It ships inside the package as `assets/tinyshakespeare.txt.xz` (Python lzma, preset 9 | extreme,
364,404 bytes), is checked against the size and sha256 above on every load, and is used like any
single-file character corpus: split by bytes 90% train / 5% valid / 5% test.
"""

from __future__ import annotations

import hashlib
import lzma
from importlib import resources

from hyperrouter.errors import HyperRouterError

NAME = "tinyshakespeare (built-in)"
SOURCE = "built-in tiny Shakespeare (karpathy/char-rnn data/tinyshakespeare/input.txt)"
ASSET = "tinyshakespeare.txt.xz"
SIZE = 1_115_394
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def builtin_corpus_bytes() -> bytes:
    """The built-in corpus text, verified against its published size and sha256."""
    asset = resources.files("hyperrouter.data") / "assets" / ASSET
    try:
        data = lzma.decompress(asset.read_bytes())
    except (OSError, lzma.LZMAError) as err:
        raise HyperRouterError(
            f"the built-in corpus asset {asset} is missing or corrupt ({err}); "
            f"reinstall hyperrouter"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != SIZE or digest != SHA256:
        raise HyperRouterError(
            f"the built-in corpus asset {asset} is corrupt ({len(data):,} bytes, sha256 "
            f"{digest[:12]}..., expected {SIZE:,} bytes, sha256 {SHA256[:12]}...); "
            f"reinstall hyperrouter"
        )
    return data

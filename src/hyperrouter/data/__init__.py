"""Text corpora, vocabularies, language-model batching and classification datasets."""

from hyperrouter.data.corpus import Corpus, load_corpus
from hyperrouter.data.iterators import LMOrderedIterator
from hyperrouter.data.vocab import Vocab

__all__ = ["Corpus", "LMOrderedIterator", "Vocab", "load_corpus"]

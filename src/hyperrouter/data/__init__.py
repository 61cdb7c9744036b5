"""Text corpora, vocabularies, language-model batching and classification datasets."""

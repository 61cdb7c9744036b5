"""Configuration, the training loop, evaluation and checkpoint IO."""

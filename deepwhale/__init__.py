"""deepwhale: load, run, serve, train and evaluate DeepSeek-family language models."""

__version__ = "0.1.0"

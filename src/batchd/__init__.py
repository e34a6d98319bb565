"""batchd: a self-hosted, wire-compatible Batch API for large language models."""

__version__ = "0.1.0"

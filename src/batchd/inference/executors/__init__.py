"""Batch executors: a stored request line to its ``RequestOutcome``, by endpoint.

``registry`` owns the endpoint -> executor table the scheduler runs rows through.
"""

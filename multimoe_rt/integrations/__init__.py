"""Integrations with other frameworks, on top of the runtime: transformers (``hf``); later the HTTP
server and Ray Serve. Nothing in the runtime imports this subpackage at module level."""

"""Integrations with other frameworks, on top of the runtime: transformers (``hf``), the OpenAI-compatible
HTTP server (``server``, ``openai_api``, ``server_args``) and Ray Serve (``ray_serve``, ``groups``). Nothing in the
runtime imports this subpackage at module level."""

"""``kvtier router``: an OpenAI-compatible proxy that sends each request to the engine instance holding the
longest cached prefix of its prompt (or, in disaggregated mode, prefills on one instance and decodes on
another). Modules: :mod:`policy` (backends, health, choice), :mod:`prefix` (the router's own prefix
table), :mod:`kv` (controller lookups with the table as fallback), :mod:`tokens` (prompt token ids the
way vLLM computes them), :mod:`metrics`, :mod:`app` (HTTP), :mod:`cli`.
"""

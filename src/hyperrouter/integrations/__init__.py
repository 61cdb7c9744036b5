"""Bridges to other libraries, each imported only when used (never by `import hyperrouter`).

- `hyperrouter.integrations.transformers`: hyperrouter routers inside HuggingFace transformers MoE
  models (`replace_routers`, `set_top_k`) and sparse upcycling of dense transformers decoders into
  hyperrouter MoE layers (`upcycle`); needs the `hf` extra (`bash scripts/setup.sh hf`).
"""

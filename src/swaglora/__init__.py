"""swaglora: SWAG and MultiSWAG posteriors over LoRA adapters of causal LLMs."""

__version__ = "0.1.0"

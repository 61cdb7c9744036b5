"""Models: Transformer-XL language models with MoE layers, and classifiers built on them."""

from hyperrouter.models.transformer_xl import LMOutput, ModelConfig, MoEConfig, TransformerXL

__all__ = ["LMOutput", "ModelConfig", "MoEConfig", "TransformerXL"]

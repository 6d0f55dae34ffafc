"""Flax model definitions and weight loaders (no quantization logic here).

Small models for tests and examples are re-exported; the real pretrained
models live in `models.minilm` and `models.smollm2`.
"""

from models.simple_mlp import NnxMLP
from models.simple_mlp import SimpleMLP
from models.transformer import NnxTransformer
from models.transformer import Transformer

__all__ = ['NnxMLP', 'NnxTransformer', 'SimpleMLP', 'Transformer']

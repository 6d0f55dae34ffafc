"""Checkpoints: param trees to and from safetensors, and checkpoints
quantized block by block (models bigger than memory).
"""

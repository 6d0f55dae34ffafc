"""QLoRA from the reconstruction: adapters to and from LQER params, and the
optax training step.
"""

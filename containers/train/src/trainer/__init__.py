"""Fine-tuning inside a SageMaker training container: `python -m trainer` (or the `train` executable)."""

"""medlora: LoRA fine-tuning of Nemotron-H on MedMCQA."""
__version__ = "0.1.0"

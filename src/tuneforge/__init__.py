"""tuneforge: fine-tune pretrained models with one command and one flat YAML file."""

__version__ = "0.1.0"

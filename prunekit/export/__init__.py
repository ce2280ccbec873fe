"""Export: standard Hugging Face directories with the recipe and report beside the weights."""
from .save import RECIPE_FILE, REPORT_FILE, check_output, save_pretrained

__all__ = ["RECIPE_FILE", "REPORT_FILE", "check_output", "save_pretrained"]

"""Export: one save path for every result (a Hugging Face directory or safetensors, with the
recipe, the report and, when the architecture changed, the structure record)."""
from .save import RECIPE_FILE, REPORT_FILE, WEIGHTS_FILE, check_output, save

__all__ = ["RECIPE_FILE", "REPORT_FILE", "WEIGHTS_FILE", "check_output", "save"]

"""Export recipes: JSON presets read by dg_export.recipes (this file only makes the folder installable)."""

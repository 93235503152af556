"""The embedded demo model: a tiny DiffusionGemma trained here on synthetic tasks with checkable answers."""

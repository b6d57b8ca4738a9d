"""Checks of the papers behind compressor's algorithms (see RESULTS.md in this folder)."""

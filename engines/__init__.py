"""engines package (see DESIGN.md)."""

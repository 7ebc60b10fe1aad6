"""validation package (see DESIGN.md)."""

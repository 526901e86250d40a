"""Pure-function model core: jit these functions of plain params dicts."""

"""Pure-function model core (jit these) and the NNX modules that hold the same params."""

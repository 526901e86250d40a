"""Weight use and attention building blocks shared by the vision tower, the language model and the engine."""
